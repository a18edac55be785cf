"""Real models that tripped the recording core: AMP with step() after update(), parametrized
layers, parameters outside every leaf, user hooks added after watch(), reentrant checkpointing."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations
from torch.utils.checkpoint import checkpoint

import gradscope
from gradscope.recording.layers import with_activations
from gradscope.testing import TinyMLP, batches

STAT_COLUMNS = ["act_mean", "act_std", "act_rms", "act_absmax", "act_zero_frac", "act_sat_frac",
                "grad_out_norm", "grad_out_rms", "param_norm", "grad_norm"]


def squared_norm(tensors) -> float:
    return sum(float(t.detach().double().norm() ** 2) for t in tensors)


def assert_frames_close(got: pd.DataFrame, want: pd.DataFrame, keys: list[str], columns: list[str]) -> None:
    got, want = got.set_index(keys).sort_index(), want.set_index(keys).sort_index()
    assert list(got.index) == list(want.index)
    for column in columns:
        np.testing.assert_allclose(got[column].to_numpy(float), want[column].to_numpy(float), rtol=1e-5,
                                   atol=1e-7, equal_nan=True, err_msg=column)


# ---------------------------------------------------------------------------- (a) AMP, no optimizer=


def _amp_run(run, order: str, scaled: bool, steps: int = 3):
    """TinyMLP trained with a GradScaler (scale 1024, doubling every step) and no optimizer=;
    ``order`` says where rec.step() comes. Unscaled: the same training without a scaler."""
    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1, enabled=scaled)
    with gradscope.watch(model, run, scaler=scaler if scaled else None) as rec:
        for x, y in batches("mlp", steps=steps):
            opt.zero_grad()
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            if order == "before scaler.step":
                rec.step()
            scaler.step(opt)
            if order == "between step and update":
                rec.step()
            scaler.update()
            if order == "after scaler.update":
                rec.step()
    return gradscope.load_run(run)


@pytest.mark.parametrize("order", ["before scaler.step", "between step and update", "after scaler.update"])
def test_scaler_without_optimizer_records_unscaled_gradients_in_any_order(order, tmp_path):
    got = _amp_run(tmp_path / "amp", order, scaled=True)
    want = _amp_run(tmp_path / "plain", order, scaled=False)
    assert got.scalars.loss_scale.tolist() == [1024.0, 2048.0, 4096.0]  # the scale each backward ran with
    columns = ["grad_norm", "grad_out_norm", "param_norm", "act_std"]
    assert_frames_close(got.layers, want.layers, ["step", "phase", "layer"], columns)
    np.testing.assert_allclose(got.scalars.grad_global_norm, want.scalars.grad_global_norm, rtol=1e-5)


# ---------------------------------------------------------------------------- (b) parametrized layers


@pytest.mark.parametrize("parametrize", [parametrizations.weight_norm, parametrizations.spectral_norm])
def test_parametrized_layers_are_watched_with_all_their_parameters(parametrize, run_dir):
    torch.manual_seed(0)
    model = nn.Sequential(parametrize(nn.Linear(8, 16)), nn.ReLU(), parametrize(nn.Linear(16, 4)))
    (x, y), = batches("mlp", steps=1)
    with gradscope.watch(model, run_dir) as rec:
        F.cross_entropy(model(x), y).backward()
        rec.step()
    run = gradscope.load_run(run_dir)
    assert run.layer_table.name.tolist() == ["0", "2"]  # not "0.parametrizations.weight.0"
    assert run.layer_table.type.tolist() == ["Linear", "Linear"]
    rows = run.layers[run.layers.phase == "train"].set_index("layer")
    for name in ("0", "2"):
        params = list(model.get_submodule(name).parameters())  # bias and the weight's originals
        assert len(params) >= 2
        assert math.isclose(rows.loc[name, "param_norm"], math.sqrt(squared_norm(params)), rel_tol=1e-5)
        assert math.isclose(rows.loc[name, "grad_norm"], math.sqrt(squared_norm(p.grad for p in params)),
                            rel_tol=1e-5)
        assert run.layer_table.set_index("name").loc[name, "params"] == sum(p.numel() for p in params)
        assert np.isfinite(rows.loc[name, "grad_out_norm"])


# ---------------------------------------------------------------------------- (c) parameters outside leaves


class Stem(nn.Module):
    """A container with a parameter of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(8))
        self.fc = nn.Linear(8, 8)

    def forward(self, h):
        return self.fc(h) * self.gain


class WithPositions(nn.Module):
    """A top-level positional embedding, a container's parameter and nn.MultiheadAttention's
    in_proj_weight: parameters that no leaf module owns."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(0.1 * torch.randn(3, 8))
        self.stem = Stem()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.stem(x + self.pos)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h.mean(1))


def test_parameters_outside_every_leaf_get_rows_of_their_own(run_dir, tmp_path):
    torch.manual_seed(0)
    model = WithPositions()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 3, 8), torch.randint(0, 4, (16,))
    grads = {}
    with gradscope.watch(model, run_dir, optimizer=opt) as rec:
        for _ in range(2):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            params = {n: p.detach().clone() for n, p in model.named_parameters()}
            rec.step(loss=loss)
            opt.step()
    run = gradscope.load_run(run_dir)
    table = run.layer_table.set_index("name")
    for name in ("pos", "stem.gain", "attn.in_proj_weight", "attn.in_proj_bias"):
        assert table.loc[name, "type"] == "Parameter"
    assert table.params.sum() == sum(p.numel() for p in model.parameters())  # each parameter once
    last = run.layers[(run.layers.step == 1) & (run.layers.phase == "train")].set_index("layer")
    assert math.isclose((last.grad_norm ** 2).sum(), squared_norm(grads.values()), rel_tol=1e-5)
    assert math.isclose((last.param_norm ** 2).sum(), squared_norm(params.values()), rel_tol=1e-5)
    global_norm = run.scalars.set_index("step").loc[1, "grad_global_norm"]
    assert math.isclose(global_norm ** 2, squared_norm(grads.values()), rel_tol=1e-5)
    pos = last.loc["pos"]
    assert math.isclose(pos.grad_norm, float(grads["pos"].norm()), rel_tol=1e-5)
    assert math.isclose(pos.update_ratio, 0.1 * pos.grad_norm / pos.param_norm, rel_tol=1e-5)
    assert pos[["act_std", "grad_out_norm"]].isna().all()  # norms only: no probe on a parameter
    # the run reads, diagnoses and renders with these rows
    gradscope.diagnose(run)
    from gradscope import reports

    assert reports.build([run_dir], tmp_path / "r.html").exists()


def test_a_filter_of_the_user_gets_no_parameter_rows(run_dir):
    model = WithPositions()
    with gradscope.watch(model, run_dir, modules=nn.Linear) as rec:
        model(torch.randn(2, 3, 8)).sum().backward()
        rec.step()
    assert "Parameter" not in set(gradscope.load_run(run_dir).layer_table.type)


# ---------------------------------------------------------------------------- (d) user hooks after watch()


class Residual(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, h):
        return h + self.fc(torch.tanh(h))


def _hooked_run(run, every: int):
    """Hooks added after watch() that double a layer's output and a block's input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), Residual(8), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, run, every=every, optimizer=opt, blocks="1"):
        model[0].register_forward_hook(lambda m, args, out: out * 2)
        model[1].register_forward_pre_hook(lambda m, args: (args[0] * 2,))
        for x, y in batches("mlp", steps=6):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return gradscope.load_run(run)


def test_user_hooks_added_after_watch_never_change_what_is_seen(tmp_path):
    every2 = _hooked_run(tmp_path / "every2", every=2)
    every1 = _hooked_run(tmp_path / "every1", every=1)
    assert sorted(every2.layers.step.unique()) == [0, 2, 4]
    want_layers = every1.layers[every1.layers.step.isin([0, 2, 4])]
    assert_frames_close(every2.layers, want_layers, ["step", "phase", "layer"], STAT_COLUMNS)
    want_blocks = every1.blocks[every1.blocks.step.isin([0, 2, 4])]
    assert_frames_close(every2.blocks, want_blocks, ["step", "block"],
                        ["id_rel_residual", "id_cos", "grad_in_norm", "grad_out_norm"])
    # gradscope sees layer 0's own output, before the user's hook doubles it
    seen = every2.layers.set_index(["step", "layer"]).act_absmax
    assert seen[(0, "0")] > 0 and np.isfinite(every2.blocks.id_rel_residual).all()


# ---------------------------------------------------------------------------- (e) checkpointing


class Checkpointed(nn.Module):
    """A residual block and an MLP segment, each checkpointed with ``reentrant`` (None: not at all)."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.inp = nn.Linear(8, 16)
        self.res = Residual(16)
        self.mid = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = self.inp(x)
        for part in (self.res, self.mid):
            h = part(h) if self.reentrant is None else checkpoint(part, h, use_reentrant=self.reentrant)
        return self.out(h)


def _checkpoint_run(run, reentrant: bool | None, frozen: bool):
    torch.manual_seed(0)
    model = Checkpointed(reentrant)
    if frozen:
        model.mid[2].eval()  # a module in eval mode inside the checkpoint: phase "eval", as without one
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, run, optimizer=opt, modules=with_activations, blocks="res"):
        for x, y in batches("mlp", steps=2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            with torch.no_grad():  # a validation pass in training mode: eval rows
                model(x)
            opt.step()
    return gradscope.load_run(run)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad:UserWarning")  # the no_grad pass
@pytest.mark.parametrize(("reentrant", "frozen"), [(True, False), (False, False), (True, True)])
def test_checkpointed_layers_are_recorded_as_training(reentrant, frozen, tmp_path):
    got = _checkpoint_run(tmp_path / "checkpointed", reentrant, frozen)
    want = _checkpoint_run(tmp_path / "plain", None, frozen)
    assert got.layer_table.sort_values("depth").name.tolist() == want.layer_table.sort_values("depth").name.tolist()
    assert got.layer_table.calls.tolist() == want.layer_table.calls.tolist()  # no forward counted twice
    assert_frames_close(got.layers, want.layers, ["step", "phase", "layer"], STAT_COLUMNS)
    assert_frames_close(got.blocks, want.blocks, ["step", "block"],
                        ["id_rel_residual", "id_cos", "id_grad_ratio", "grad_in_norm", "grad_out_norm"])
    assert got.blocks.grad_in_norm.notna().all()
    train = got.layers[got.layers.phase == "train"]
    assert len(train) == 2 * len(got.layer_table)
    assert train.grad_out_norm.notna().sum() == 2 * (len(got.layer_table) - frozen)
