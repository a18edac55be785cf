"""The analyses (``gradscope.analyses``, ``gradscope analyse``): shattered gradients, lesions and
the gradient noise scale, on the papers' settings, stored in runs and shown in reports."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from gradscope.cli.main import main
from torch import nn

import gradscope
from gradscope.analyses import shattering
from gradscope.analyses.shattering import measures
from gradscope.lab import models
from gradscope.lab.presets import PRESETS
from gradscope.lab.train import rebuild, train
from gradscope.store.lock import RunLockedError

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
import scenarios  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _paper_net(name: str, seed: int) -> nn.Module:
    """Balduzzi et al. 2017's setting: a 1-D input, 24 fully connected ReLU layers of 200 with BatchNorm."""
    torch.manual_seed(seed)
    return models.create(name, depth=24, width=200, in_channels=1, input_size=1, num_classes=1, norm="batch")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ shattering


@pytest.mark.parametrize("seed", [0, 1])
def test_plain_gradients_shatter_and_residual_ones_do_not_at_initialisation(seed):
    line = (torch.tensor([-2.0]), torch.tensor([2.0]))
    plain = shattering(_paper_net("mlp_plain", seed), *line)
    residual = shattering(_paper_net("mlp_residual", seed), *line)
    assert plain.autocorr_lag1.item() < 0.2
    assert residual.autocorr_lag1.item() > 0.5
    assert residual.spectrum_slope.item() < plain.spectrum_slope.item() - 0.5  # toward brown noise
    assert plain.points.item() == residual.points.item() == 256


def test_measures_of_white_and_brown_noise():
    rng = np.random.default_rng(0)
    white = rng.standard_normal((4096, 1))
    brown = np.cumsum(white, axis=0)
    w, b = measures(white), measures(brown)
    assert abs(w["autocorr_lag1"]) < 0.05 and abs(w["spectrum_slope"]) < 0.2
    assert b["autocorr_lag1"] > 0.95 and b["spectrum_slope"] == pytest.approx(-2, abs=0.3)


def test_shattering_leaves_the_model_and_the_random_stream_as_they_were():
    model = _paper_net("mlp_plain", 0).eval()
    before, rng = _state(model), torch.get_rng_state()
    shattering(model, torch.tensor([-1.0]), torch.tensor([1.0]), points=64)  # train mode inside: BN updates
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


def test_shattering_refuses_token_inputs_without_an_embedding_to_lay_the_line_in():
    with pytest.raises(ValueError, match="floating point"):
        shattering(nn.Embedding(4, 2), torch.tensor([0]), torch.tensor([3]))
    with pytest.raises(ValueError, match="no module 'nowhere'"):
        shattering(nn.Embedding(4, 2), torch.tensor([0]), torch.tensor([3]), at="nowhere")


def test_shattering_in_an_embedding_space_equals_it_on_the_embeddings_as_inputs():
    """at="0": the line between two token sequences' embeddings, through the rest of the model;
    the same as the rest of the model given those embeddings as its (continuous) inputs."""
    torch.manual_seed(0)
    rest = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5))
    model = nn.Sequential(nn.Embedding(10, 8), rest)
    a, b = torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8])
    inside = shattering(model, a, b, at="0", points=64)
    direct = shattering(rest, model[0](a).detach(), model[0](b).detach(), points=64)
    assert inside.autocorr_lag1.item() == pytest.approx(direct.autocorr_lag1.item(), rel=1e-6)
    assert inside.grad_norm_mean.item() == pytest.approx(direct.grad_norm_mean.item(), rel=1e-6)


class _ScaledInPlace(nn.Module):
    """Scales the embedding in place, as some Transformers do (x *= sqrt(d_model))."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(10, 8), nn.Sequential(nn.Tanh(), nn.Linear(8, 3))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h *= 8 ** 0.5
        return self.head(h)


def test_shattering_in_an_embedding_space_followed_by_an_in_place_op():
    torch.manual_seed(0)
    rows = shattering(_ScaledInPlace(), torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]), at="embed", points=32)
    assert np.isfinite(rows.grad_norm_mean.item()) and rows.grad_norm_mean.item() > 0


# ---------------------------------------------------------------------------------- lesion


@pytest.fixture(scope="module")
def degraded(tmp_path_factory) -> Path:
    """plain20 and resnet20 trained with the degradation preset's recipe (16x16 images, batch 32),
    300 of its 2,000 steps."""
    out = tmp_path_factory.mktemp("degradation")
    preset = PRESETS["degradation"]
    for name in ("plain20", "resnet20"):
        train(name, task=preset.task, steps=300, every=50, out=out, batch_size=preset.batch_size, progress=False,
              eval_limit=64, task_options=preset.task_options)
    return out


def test_lesion_residual_blocks_matter_10x_less_than_plain_ones(degraded):
    result = CliRunner().invoke(main, ["analyse", "lesion", str(degraded / "plain20"), str(degraded / "resnet20"),
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "median loss increase" in result.output
    plain, residual = (gradscope.load_run(degraded / name).lesion for name in ("plain20", "resnet20"))
    assert len(plain) == len(residual) == 9 and (plain.step == 300).all()
    assert plain.residual.eq(False).all() and residual.residual.all()
    # the two stage-opening blocks change shape: kept, with the reason, and no loss
    assert plain.reason.notna().sum() == 2 and plain.loss[plain.reason.notna()].isna().all()
    median_plain, median_residual = plain.loss_increase.median(), residual.loss_increase.median()
    assert median_residual * 10 <= median_plain, (median_plain, median_residual)


def test_lesion_rows_and_an_untouched_model():
    torch.manual_seed(0)
    model = models.create("mlp_residual", depth=6, width=16, in_channels=1, input_size=4, num_classes=3,
                          norm="batch")
    x, y = torch.randn(32, 1, 4, 4), torch.randint(0, 3, (32,))
    before = _state(model)
    rows = gradscope.analyses.lesion(model, x, y, step=7)
    assert list(rows.block) == [f"blocks.{i}" for i in range(4)] and list(rows.order) == [0, 1, 2, 3]
    assert (rows.step == 7).all() and rows.loss.notna().all() and rows.accuracy.between(0, 1).all()
    assert np.allclose(rows.loss - rows.base_loss, rows.loss_increase)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and not any(m._forward_hooks for m in model.modules())
    out = model.eval()(x)  # removing the block is really removing it: the model without blocks.0
    with torch.no_grad():
        h = model.stem(x)
        for block in list(model.blocks)[1:]:
            h = block(h)
        expected = torch.nn.functional.cross_entropy(model.head(h), y).item()
    assert rows.loss.iloc[0] == pytest.approx(expected, rel=1e-5)
    assert out.shape == (32, 3)


class _CachingBlock(nn.Module):
    """Returns (hidden state, cache), as a Hugging Face block does."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, str]:
        return x + self.lin(x), "cache"


class _CachingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_CachingBlock(), _CachingBlock()])
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x, cache = block(x)
            assert cache == "cache"  # the rest of a block's outputs pass through a lesion
        return self.head(x)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("how", ["torch.compile", "model.compile"])
def test_lesion_of_a_compiled_model_is_the_eager_lesion(how):
    """Dynamo runs code compiled without the lesion's identity hook (added after the model's
    first compiled call), so every block read as removed without effect (loss increase 0). The
    analyses run the model's Python instead; the compiled code is kept: nothing recompiles after."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = models.create("mlp_residual", depth=6, width=16, in_channels=1, input_size=4, num_classes=3)
    x, y = torch.randn(32, 1, 4, 4), torch.randint(0, 3, (32,))
    eager = gradscope.analyses.lesion(model, x, y)
    if how == "torch.compile":
        runner = target = torch.compile(model, backend="aot_eager")
    else:
        model.compile(backend="aot_eager")
        runner = target = model
    counters.clear()
    with torch.no_grad():
        runner.eval()(x)  # compiled now, without any lesion hook
    graphs = counters["stats"]["unique_graphs"]
    compiled = gradscope.analyses.lesion(target, x, y)
    assert (eager.loss_increase.abs() > 1e-3).all()  # (removing a block matters)
    pd.testing.assert_frame_equal(compiled, eager)
    with torch.no_grad():
        runner(x)
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


def test_lesion_of_blocks_returning_several_outputs():
    torch.manual_seed(0)
    model, x, y = _CachingNet(), torch.randn(16, 4), torch.randint(0, 3, (16,))
    rows = gradscope.analyses.lesion(model, x, y)
    assert list(rows.block) == ["blocks.0", "blocks.1"] and rows.reason.isna().all()
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model.head(model.blocks[1](x)[0]), y).item()
    assert rows.loss.iloc[0] == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------ noise scale


def test_noise_scale_matches_the_per_example_computation(tmp_path):
    """Micro-batch norms of gradient accumulation (4 x 8 samples) against the direct |G|^2 and
    tr(Sigma) over every example's own gradient, on a linear model held still (lr 0)."""
    x, y = scenarios.noise_problem()
    model = scenarios.noise_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradscope.watch(model, tmp_path / "run", optimizer=opt, noise_scale=True, flush_every=250):
        scenarios.noise_steps(model, opt, x, y, steps=1000, micro=4, size=8, seed=0)
    table = gradscope.analyses.noise_scale(tmp_path / "run")
    assert (table.b_small == 8).all() and (table.b_big == 32).all() and len(table) == 1000
    g_sq, trace = scenarios.per_example_truth(scenarios.noise_model(), x, y)
    assert table.g_sq.mean() == pytest.approx(g_sq, rel=0.05)
    assert table.trace_sigma.mean() == pytest.approx(trace, rel=0.05)
    assert table.trace_sigma.mean() / table.g_sq.mean() == pytest.approx(trace / g_sq, rel=0.05)
    assert table.b_simple.iloc[-1] == pytest.approx(table.trace_sigma_smooth.iloc[-1] / table.g_sq_smooth.iloc[-1])
    # the stored, smoothed B_simple (a ratio of two averages, itself noisy step to step): its median
    # over the second half measured +7% here; within 10% of the truth
    assert table.b_simple.iloc[500:].median() == pytest.approx(trace / g_sq, rel=0.10)


def test_noise_scale_is_off_unless_asked_and_leaves_no_hook(tmp_path):
    model = scenarios.noise_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = scenarios.noise_problem()
    with gradscope.watch(model, tmp_path / "off", optimizer=opt):
        assert all(not p._backward_hooks for p in model.parameters())
        scenarios.noise_steps(model, opt, x, y, steps=3, micro=2, size=4, seed=0)
    run = gradscope.load_run(tmp_path / "off")
    assert run.scalars.grad_small_sq.isna().all() and run.meta["noise_scale"] is False
    with pytest.raises(ValueError, match="noise_scale=True"):
        gradscope.analyses.noise_scale(run)
    with gradscope.watch(model, tmp_path / "on", optimizer=opt, noise_scale=True):
        assert all(p._backward_hooks for p in model.parameters())
    assert all(not p._backward_hooks for p in model.parameters())
    with pytest.raises(FileExistsError):  # a refused run leaves no hook behind either
        gradscope.watch(model, tmp_path / "on", optimizer=opt, noise_scale=True)
    assert all(not p._backward_hooks for p in model.parameters()) and not model._forward_pre_hooks


def test_noise_scale_recording_is_an_observer(tmp_path):
    x, y = scenarios.noise_problem()
    finals = []
    for watched in (False, True):
        model = scenarios.noise_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        rec = gradscope.watch(model, tmp_path / "obs", optimizer=opt, noise_scale=True, every=2,
                              overwrite=True) if watched else None
        scenarios.noise_steps(model, opt, x, y, steps=8, micro=3, size=5, seed=1)
        if rec is not None:
            rec.close()
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))
    recorded = gradscope.load_run(tmp_path / "obs").scalars
    assert list(recorded.step[recorded.grad_small_sq.notna()]) == [0, 2, 4, 6]  # on recorded steps only


# ---------------------------------------------------------------------------------- storing


def _frame(step: int, value: float) -> pd.DataFrame:
    return pd.DataFrame([{"step": step, "autocorr_lag1": value, "spectrum_slope": -1.0, "grad_norm_mean": 1.0,
                          "points": 256, "line": "a -> b"}])


def test_save_into_a_closed_run_and_a_live_one(tmp_path):
    model = scenarios.noise_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = scenarios.noise_problem()
    with gradscope.watch(model, tmp_path / "run", optimizer=opt) as rec:
        scenarios.noise_steps(model, opt, x, y, steps=2, micro=1, size=4, seed=0)
        gradscope.analyses.save(rec, "shattering", _frame(2, 0.5))  # through the recorder's writer
        with pytest.raises(RunLockedError):  # never beside a live writer
            gradscope.analyses.save(tmp_path / "run", "shattering", _frame(2, 0.1))
    gradscope.analyses.save(tmp_path / "run", "shattering", _frame(5, 0.7))
    gradscope.analyses.save(tmp_path / "run", "shattering", _frame(2, 0.9))  # the same step again: replaces
    run = gradscope.load_run(tmp_path / "run")
    assert list(run.shattering.step) == [2, 5] and list(run.shattering.autocorr_lag1) == [0.9, 0.7]
    assert run.meta["parts"]["shattering"] == 3 and run.status == "finished"
    with pytest.raises(ValueError, match="no column 'bogus'"):
        gradscope.analyses.save(tmp_path / "run", "shattering", _frame(1, 0.0).assign(bogus=1))


# ------------------------------------------------------------------------ command line, report


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli")
    result = CliRunner().invoke(main, ["run", "mlp_plain", "mlp_residual", "--steps", "12", "--every", "2",
                                       "--batch-size", "32", "--accumulate", "4", "--noise-scale",
                                       "--set", "depth=6", "--set", "width=32", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


def test_cli_analyses_store_their_tables_and_the_report_shows_them(accumulated, tmp_path):
    runs = [str(accumulated / "mlp_plain"), str(accumulated / "mlp_residual")]
    for command in ("shattering", "lesion", "noise-scale"):
        result = CliRunner().invoke(main, ["analyse", command, *runs])
        assert result.exit_code == 0, (command, result.output)
    run = gradscope.load_run(runs[1])
    assert list(run.shattering.step) == [0, 12]  # at initialisation and after training
    assert len(run.lesion) == 4 and len(run.noise_scale) == 6 and (run.noise_scale.b_big == 32).all()
    assert (run.noise_scale.b_small == 8).all()
    model, _, _ = rebuild(runs[1], trained=True)
    initial, _, _ = rebuild(runs[1], trained=False)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), initial.parameters()))
    html = tmp_path / "r.html"
    assert CliRunner().invoke(main, ["report", *runs, "-o", str(html)]).exit_code == 0
    text = html.read_text()
    for section in ('id="shattering"', 'id="lesion"', 'id="noise-scale"', "Balduzzi", "Veit", "McCandlish"):
        assert section in text


def test_cli_analyses_refuse_what_they_cannot_analyse(accumulated, tmp_path):
    bare = tmp_path / "bare"
    model = scenarios.noise_model()
    with gradscope.watch(model, bare):
        model(torch.randn(2, 6)).sum().backward()
    parts = gradscope.load_run(accumulated / "mlp_plain").meta["parts"]
    for command, expected in (("lesion", "not made by `gradscope run`"), ("noise-scale", "noise_scale=True"),
                              ("shattering", "not made by `gradscope run`")):
        result = CliRunner().invoke(main, ["analyse", command, str(accumulated / "mlp_plain"), str(bare)])
        assert result.exit_code == 2 and expected in result.output, (command, result.output)
        assert "Traceback" not in result.output
    assert gradscope.load_run(accumulated / "mlp_plain").meta["parts"] == parts  # every run checked before any
    result = CliRunner().invoke(main, ["run", "mlp_plain", "--steps", "2", "--noise-scale", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--accumulate 2" in result.output
    result = CliRunner().invoke(main, ["run", "mlp_plain", "--steps", "2", "--accumulate", "3", "--batch-size", "32",
                                       "--out", str(tmp_path)])
    assert result.exit_code == 2 and "multiple of 3" in result.output


def test_shattering_checkpoints_during_training_leave_the_training_as_it_was(tmp_path):
    """``gradscope run --shattering-every``: the measures at steps 0, 3, 6 and the end, stored in
    the run while it is written; the trained weights equal those of the same run without them."""
    options = dict(steps=7, every=1, batch_size=16, progress=False, eval_limit=32,
                   overrides={"depth": 5, "width": 32, "norm": "batch"})
    train("mlp_residual", out=tmp_path, run_name="plain-run", **options)
    train("mlp_residual", out=tmp_path, run_name="checkpointed", shattering_every=3, **options)
    with_checkpoints, _, _ = rebuild(tmp_path / "checkpointed", trained=True)
    without, _, _ = rebuild(tmp_path / "plain-run", trained=True)
    assert all(torch.equal(a, b) for a, b in zip(with_checkpoints.state_dict().values(),
                                                 without.state_dict().values()))
    run = gradscope.load_run(tmp_path / "checkpointed")
    assert list(run.shattering.step) == [0, 3, 6, 7] and run.shattering.autocorr_lag1.notna().all()
    plain = gradscope.load_run(tmp_path / "plain-run")  # the checkpoints' forwards were not recorded:
    assert run.status == "finished" and len(run.layers) == len(plain.layers)  # the same statistics
    pd.testing.assert_frame_equal(run.layers.drop(columns="calls", errors="ignore"),
                                  plain.layers.drop(columns="calls", errors="ignore"))
    lm = train("transformer_lm_pre", out=tmp_path, steps=2, shattering_every=1, progress=False, eval_limit=8,
               overrides={"depth": 2})  # token ids: the line runs through the token embedding
    assert list(gradscope.load_run(lm.run).shattering.step) == [0, 1, 2]
    result = CliRunner().invoke(main, ["analyse", "shattering", str(lm.run), "--points", "32"])
    assert result.exit_code == 0, result.output
    assert (gradscope.load_run(lm.run).shattering.points == [32, 256, 32]).all()  # 0 and 2 again: replaced
    with pytest.raises(ValueError, match="two inputs"):
        train("transformer_seq2seq_pre", out=tmp_path, steps=1, shattering_every=1, progress=False)


@pytest.mark.filterwarnings("ignore")
def test_noise_scale_of_compiled_models(tmp_path):
    """Both ways of compiling count the micro-batches' samples: torch.compile(model)'s wrapper runs
    its hook as Python, and model.compile() compiles the model's ``forward`` but not torch's
    ``_call_impl`` that calls the model's own hooks, which Dynamo enters from Python and gradscope
    runs as Python (``compilation.python_when_entered``; before, Dynamo compiled the hook on its
    own, the samples went uncounted and the analysis asked for batch_small)."""
    x, y = scenarios.noise_problem()
    tables = {}
    for how in ("wrapper", "in place"):
        model = scenarios.noise_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        net = torch.compile(model) if how == "wrapper" else model
        if how == "in place":
            model.compile()
        with gradscope.watch(net, tmp_path / how.replace(" ", "_"), optimizer=opt, noise_scale=True):
            scenarios.noise_steps(net, opt, x, y, steps=4, micro=4, size=8, seed=0)
        tables[how] = gradscope.load_run(tmp_path / how.replace(" ", "_"))
    for table in tables.values():
        assert (table.scalars.batch_small == 8).all()
    wrapper, in_place = (gradscope.analyses.noise_scale(tables[how]) for how in ("wrapper", "in place"))
    assert (in_place.b_big == 32).all()
    np.testing.assert_allclose(in_place.g_sq, wrapper.g_sq, rtol=1e-4)


# ------------------------------------------------ noise scale where training does something unusual


def _micro_loop(model, opt, x, y, steps, *, scaler=None, inf_at=None, fail_at=None, extra_forward=False):
    """Steps of 4 micro-batches of 8 (loss / 4); ``inf_at``: the first micro-batch's loss of that
    step is inf (a GradScaler skips the step); ``fail_at``: that step's third backward raises and
    the step is abandoned (zero_grad, no update); ``extra_forward``: a forward with autograd on
    that no backward follows, before each step."""
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        if extra_forward:
            model(x[:5])
        opt.zero_grad()
        try:
            for k in range(4):
                i = torch.randint(0, len(x), (8,), generator=g)
                loss = torch.nn.functional.mse_loss(model(x[i]), y[i]) / 4
                if step == inf_at and k == 0:
                    loss = loss * float("inf")
                if step == fail_at and k == 2:
                    loss = loss + _Raise.apply(loss)
                (scaler.scale(loss) if scaler else loss).backward()
        except RuntimeError:
            opt.zero_grad()
            continue
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()


class _Raise(torch.autograd.Function):
    """A backward that fails (an out-of-memory error the loop catches)."""

    @staticmethod
    def forward(ctx, t):
        return t * 0

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("simulated out of memory")


@pytest.mark.parametrize("case", ["skipped by the GradScaler", "failed backward", "forward without backward"])
def test_noise_scale_counts_only_each_steps_own_micro_batches(tmp_path, case):
    x, y = scenarios.noise_problem()
    model = scenarios.noise_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    options = {"skipped by the GradScaler": dict(scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10), inf_at=0),
               "failed backward": dict(fail_at=1), "forward without backward": dict(extra_forward=True)}[case]
    with gradscope.watch(model, tmp_path / "r", optimizer=opt, every=2, noise_scale=True,
                         scaler=options.get("scaler")):
        _micro_loop(model, opt, x, y, 6, **options)
    s = gradscope.load_run(tmp_path / "r").scalars
    kept = s[s.small_batches.notna()]
    assert len(kept) >= 2 and (kept.step % 2 == 0).all()
    assert (kept.small_batches == 4).all() and (kept.batch_small == 8).all() and (kept.batch_big == 32).all()


def test_noise_scale_takes_the_backwards_after_a_reset_of_the_gradients(tmp_path):
    """LBFGS evaluates its closure 3 times a step, each after zero_grad: only the last backward is
    in the update, so each step holds one small batch (no estimate, and no wrong one)."""
    x, y = scenarios.noise_problem()
    model = scenarios.noise_model()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.0, max_iter=3)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[:32]), y[:32])
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match="reset between two backward passes"):
        with gradscope.watch(model, tmp_path / "r", optimizer=opt, noise_scale=True):
            for _ in range(2):
                opt.step(closure)
    s = gradscope.load_run(tmp_path / "r").scalars
    assert (s.small_batches == 1).all() and (s.batch_small == 32).all()
    with pytest.raises(ValueError, match="no small-batch"):
        gradscope.analyses.noise_scale(tmp_path / "r")


def test_noise_scale_of_sparse_gradients(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 4, sparse=True), nn.Flatten(), nn.Linear(12, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ids = torch.randint(0, 20, (8, 3))
    with gradscope.watch(model, tmp_path / "r", optimizer=opt, noise_scale=True):
        opt.zero_grad()
        for half in (ids[:4], ids[4:]):  # repeated ids: their rows add up before the norm
            (model(half).square().mean() / 2).backward()
        opt.step()
    expected = []
    for half in (ids[:4], ids[4:]):
        model.zero_grad()
        model(half).square().mean().backward()
        expected.append(sum(float(p.grad.to_dense().square().sum()) for p in model.parameters()))
    s = gradscope.load_run(tmp_path / "r").scalars
    assert s.grad_small_sq.iloc[0] == pytest.approx(np.mean(expected), rel=1e-5)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("when", ["between steps", "between micro-batches"])
def test_an_analysis_on_a_model_compiled_in_place_is_not_recorded(tmp_path, when):
    """model.compile() traces the probes, which measure every forward into the staging: what an
    analysis's forwards add is taken out again, also mid-step (a Lightning batch-end callback)."""
    x, y = torch.randn(32, 1), torch.randn(32, 1)
    layers = {}
    for analyse in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1))
        model.compile()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        with gradscope.watch(model, tmp_path / str(analyse), optimizer=opt):
            for step in range(3):
                opt.zero_grad()
                for micro in range(2):
                    if analyse and step == 1 and micro == (0 if when == "between steps" else 1):
                        shattering(model, torch.tensor([-1.0]), torch.tensor([1.0]), points=64)
                    torch.nn.functional.mse_loss(model(x[16 * micro:16 * (micro + 1)]),
                                                 y[16 * micro:16 * (micro + 1)]).backward()
                opt.step()
        layers[analyse] = gradscope.load_run(tmp_path / str(analyse)).layers
    pd.testing.assert_frame_equal(layers[True], layers[False])


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.a, self.b, self.c, self.reentrant = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 1), reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if self.reentrant is None:
            h = torch.relu(self.b(h))
        else:  # a reentrant checkpoint runs a backward of its own inside the model's
            h = torch.utils.checkpoint.checkpoint(lambda t: torch.relu(self.b(t)), h, use_reentrant=self.reentrant)
        return self.c(h)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", ["reentrant checkpoint", "autograd.grad first", "two backwards of one forward"])
def test_noise_scale_small_batches_are_the_backwards_that_build_the_update(tmp_path, case):
    """Activation checkpointing changes nothing; a pass that adds nothing to .grad (autograd.grad on
    the parameters, for a norm) is left out; two backwards of one forward leave the step without
    small batches (they cannot be told apart), with a warning."""
    x, y = scenarios.noise_problem()
    tables = {}
    for variant in ("plain", case):
        torch.manual_seed(1)
        model = _Checkpointed(True if variant == "reentrant checkpoint" else None)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        warns = pytest.warns(RuntimeWarning, match="several backward passes of one forward") \
            if variant == "two backwards of one forward" else contextlib.nullcontext()
        with warns, gradscope.watch(model, tmp_path / variant.replace(" ", "_"), optimizer=opt, noise_scale=True):
            for _ in range(2):
                opt.zero_grad()
                for i in range(4):
                    xb = x[8 * i:8 * (i + 1)].requires_grad_(variant == "reentrant checkpoint")
                    loss = torch.nn.functional.mse_loss(model(xb), y[8 * i:8 * (i + 1)]) / 4
                    if variant == "autograd.grad first":
                        torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
                    if variant == "two backwards of one forward":
                        (loss / 2).backward(retain_graph=True)
                        loss = loss / 2
                    loss.backward()
                opt.step()
        tables[variant] = gradscope.load_run(tmp_path / variant.replace(" ", "_")).scalars
    if case == "two backwards of one forward":
        assert tables[case].small_batches.isna().all() and tables[case].grad_small_sq.isna().all()
    else:
        columns = ["small_batches", "batch_small", "batch_big", "grad_small_sq"]
        pd.testing.assert_frame_equal(tables[case][columns], tables["plain"][columns], rtol=1e-6)


def test_overwriting_a_run_removes_the_weights_it_kept(tmp_path):
    """Stale weights of another model must not stay beside a new run (rebuild would load them)."""
    train("mlp_plain", out=tmp_path, steps=1, progress=False, eval_limit=8, overrides={"depth": 3, "width": 8})
    assert (tmp_path / "mlp_plain" / "model.safetensors").is_file()
    model = scenarios.noise_model()
    with gradscope.watch(model, tmp_path / "mlp_plain", overwrite=True):
        pass
    assert not (tmp_path / "mlp_plain" / "model.safetensors").exists()
    with pytest.raises(gradscope.RunError, match="not made by `gradscope run`"):
        rebuild(tmp_path / "mlp_plain", trained=True)
