"""Attribution checkpoints with Captum: closed forms, the branch/skip split, and the observer rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from gradscope.cli.main import main
from torch import nn

import gradscope
from gradscope import Attribution
from gradscope.recording.blocks import BlockSpec
from gradscope.testing import assert_no_hooks, assert_same_parameters, hook_counts, train

WIDTH, CLASSES = 5, 3


class Residual(nn.Module):
    def __init__(self, branch: nn.Module, skip: bool = True) -> None:
        super().__init__()
        self.branch, self.skip = branch, skip

    def forward(self, x):
        return x + self.branch(x) if self.skip else self.branch(x)


class LinearResidualNet(nn.Module):
    """Two linear residual blocks and a linear head: every attribution has a closed form."""

    def __init__(self, skip: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.skip = skip
        self.blocks = nn.Sequential(Residual(nn.Linear(WIDTH, WIDTH), skip), Residual(nn.Linear(WIDTH, WIDTH), skip))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        return self.head(self.drop(self.blocks(x)))

    def gradscope_blocks(self):
        return [BlockSpec(f"blocks.{i}", branch=f"blocks.{i}.branch", residual=self.skip) for i in range(2)]


def probe(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, WIDTH, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def record(model, tmp_path, attribution, steps: int = 0, **watch):
    """Train ``steps`` SGD steps (none: the checkpoint at watch() only) and load the run."""
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, WIDTH, generator=g), torch.randint(0, CLASSES, (8,), generator=g)) for _ in range(steps)]
    train(model, data, run=tmp_path / "run", lr=0.1, call_step=False, attribution=attribution, **watch)
    return gradscope.load_run(tmp_path / "run")


def closed_form(model: LinearResidualNet, x, y):
    """Per block, in float64: outputs h, skip terms x_in, branch terms F and dS/dh for S = logit_y."""
    with torch.no_grad():
        a = [b.branch.weight.double() for b in model.blocks]
        c = [b.branch.bias.double() for b in model.blocks]
        w = model.head.weight.double()[y]  # [n, width]: dS/d(block 2 output)
        x0 = x.double()
        f1 = x0 @ a[0].T + c[0]
        h1 = x0 + f1
        f2 = h1 @ a[1].T + c[1]
        h2 = h1 + f2
        g2 = w
        g1 = w + w @ a[1]  # through block 2's skip and branch
    return [dict(h=h1, skip=x0, f=f1, g=g1), dict(h=h2, skip=h1, f=f2, g=g2)]


def test_grad_x_act_and_branch_split_match_the_closed_form(tmp_path):
    torch.manual_seed(0)
    model = LinearResidualNet()
    x, y = probe()
    run = record(model, tmp_path, Attribution((x, y), every=5))
    got = run.attribution.set_index("block")
    assert list(run.attribution.step.unique()) == [0]
    for i, ref in enumerate(closed_form(model, x, y)):
        row = got.loc[f"blocks.{i}"]
        attr = ref["g"] * ref["h"]
        branch, skip = ref["g"] * ref["f"], ref["g"] * ref["skip"]
        share = branch.abs().sum(1).mean() / (branch.abs().sum(1).mean() + skip.abs().sum(1).mean())
        expected = {"attr_sum": attr.sum(1).mean(), "attr_abs": attr.abs().sum(1).mean(),
                    "branch_attr": branch.sum(1).mean(), "skip_attr": skip.sum(1).mean(),
                    "branch_share": share, "skip_share": 1 - share}
        for column, value in expected.items():
            assert row[column] == pytest.approx(float(value), rel=1e-4, abs=1e-5), (i, column)
    assert (run.attribution.method == "grad_x_act").all()
    assert run.meta["attribution"] == {"method": "grad_x_act", "every": 5, "probe_size": 6, "target": "label",
                                       "n_steps": None}


@pytest.mark.parametrize("method", ["integrated_gradients", "conductance"])
def test_path_methods_match_the_closed_form(method, tmp_path):
    # linear model: attribution of a layer = dS/dh * (h - h at the zero input), exact for any n_steps
    torch.manual_seed(0)
    model = LinearResidualNet()
    x, y = probe()
    run = record(model, tmp_path, Attribution((x, y), every=5, method=method, n_steps=4))
    baseline = closed_form(model, torch.zeros_like(x), y)
    for i, (ref, base) in enumerate(zip(closed_form(model, x, y), baseline)):
        attr = ref["g"] * (ref["h"] - base["h"])
        row = run.attribution.set_index("block").loc[f"blocks.{i}"]
        assert row.attr_sum == pytest.approx(float(attr.sum(1).mean()), rel=1e-4, abs=1e-5)
        assert row.attr_abs == pytest.approx(float(attr.abs().sum(1).mean()), rel=1e-4, abs=1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_attribution_of_a_model_compiled_in_place_is_the_eager_one(tmp_path):
    """``model.compile()`` ran the checkpoints' forwards through Dynamo's code, compiled for the
    first Captum pass's hooks: a later pass's hooks (resnet20's shortcut modules) never ran, and
    Captum raised KeyError. Checkpoints run the model's Python instead, and equal eager ones."""
    from gradscope.lab import models
    from gradscope.testing import reference_batches, small_overrides

    overrides = small_overrides("resnet20", {"resnet": {"input_size": 8}})
    data = reference_batches("resnet20", 3, **overrides)
    probe_batch = reference_batches("resnet20", 1, batch=4, **overrides)[0]
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = models.create("resnet20", **overrides)
        if compiled:
            model.compile(backend="aot_eager")
        attribution = Attribution(probe_batch, every=2, method="integrated_gradients", n_steps=4)
        train(model, data, run=tmp_path / str(compiled), lr=0.05, call_step=False, attribution=attribution)
        runs.append(gradscope.load_run(tmp_path / str(compiled)).attribution.set_index(["step", "block"]).sort_index())
    eager, compiled = runs
    assert list(eager.index.get_level_values("step").unique()) == [0, 2]
    numeric = [c for c in eager.columns if eager[c].dtype.kind == "f"]
    assert compiled[numeric].equals(eager[numeric])
    torch._dynamo.reset()

def test_zero_branch_gives_skip_share_one_and_plain_block_branch_share_one(tmp_path):
    torch.manual_seed(0)
    model = LinearResidualNet()
    with torch.no_grad():
        model.blocks[0].branch.weight.zero_()
        model.blocks[0].branch.bias.zero_()
    run = record(model, tmp_path, Attribution(probe(), every=5))
    rows = run.attribution.set_index("block")
    assert rows.loc["blocks.0", "skip_share"] == 1.0 and rows.loc["blocks.0", "branch_attr"] == 0.0
    assert 0 < rows.loc["blocks.1", "skip_share"] < 1

    plain = LinearResidualNet(skip=False)
    run = record(plain, tmp_path / "plain", Attribution(probe(), every=5))
    assert (run.attribution.branch_share == 1.0).all() and (run.attribution.skip_attr == 0.0).all()


def test_checkpoints_follow_the_schedule_and_land_in_the_table(tmp_path):
    torch.manual_seed(0)
    run = record(LinearResidualNet(), tmp_path, Attribution(probe(), every=3), steps=7, every=2, flush_every=2)
    assert sorted(run.attribution.step.unique()) == [0, 3, 6]
    assert run.attribution.groupby("step").size().tolist() == [2, 2, 2]
    assert run.attribution.depth.notna().all()  # joined with the block table
    # the probe leaves no trace in the step statistics: one train call per recorded step
    assert run.layer_table.calls.max() == 1


def _train_pair(model_fn, tmp_path, attribution_fn, steps=6):
    """Parameters and buffers after training with and without attribution checkpoints."""
    states = []
    for with_attr in (False, True):
        attribution = attribution_fn() if with_attr else None
        torch.manual_seed(0)
        model = model_fn()
        # drawn lazily from the global generator, between the steps, as dropout draws its masks
        data = (model.example() for _ in range(steps))
        train(model, data, run=tmp_path / f"r{with_attr}", lr=0.05, momentum=0.9, call_step=False,
              attribution=attribution)
        states.append(model.state_dict())
    return states


class DropoutNet(LinearResidualNet):
    def __init__(self):
        super().__init__(dropout=0.3)

    def example(self):
        return torch.randn(8, WIDTH), torch.randint(0, CLASSES, (8,))


class SmallResNet(nn.Module):
    """resnet20 on 8x8 images: BatchNorm buffers and in-place ReLUs."""

    def __init__(self):
        super().__init__()
        self.net = gradscope.models.create("resnet20")

    def forward(self, x):
        return self.net(x)

    def gradscope_blocks(self):
        return [BlockSpec(f"net.{s.name}", branch=f"net.{s.branch}", shortcut=f"net.{s.shortcut}")
                for s in self.net.gradscope_blocks()]

    def example(self):
        return torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))


@pytest.mark.parametrize("model_fn, probe_fn", [
    (DropoutNet, lambda: (torch.randn(4, WIDTH), None)),
    (SmallResNet, lambda: (torch.randn(4, 3, 8, 8), torch.arange(4))),
])
def test_parameters_and_buffers_bit_identical_with_attribution(model_fn, probe_fn, tmp_path):
    plain, attributed = _train_pair(model_fn, tmp_path, lambda: Attribution(probe_fn(), every=2))
    assert_same_parameters(plain, attributed, "with attribution checkpoints")
    assert len(gradscope.load_run(tmp_path / "rTrue").attribution) > 0


def test_checkpoint_keeps_modes_and_gradients_and_leaves_no_hooks(tmp_path):
    torch.manual_seed(0)
    model = LinearResidualNet(dropout=0.1)
    model.train()
    model.blocks[1].eval()  # a mixed state the checkpoint must restore exactly
    rec = gradscope.watch(model, tmp_path / "run", attribution=Attribution(probe(), every=1))
    ours = hook_counts(model)
    x, y = probe(8, seed=3)
    F.cross_entropy(model(x), y).backward()
    grads = {n: (p.grad, p.grad.clone()) for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    rec.step()  # ends step 0; the checkpoint for step 1 runs here
    assert rec._attribution_done and rec._attribution_done[-1][0] == 1
    assert {n: m.training for n, m in model.named_modules()} == modes
    for n, p in model.named_parameters():
        assert p.grad is grads[n][0] and torch.equal(p.grad, grads[n][1]), n
    assert hook_counts(model) == ours  # Captum removed its hooks
    rec.close()
    assert_no_hooks(model)


def test_a_failing_probe_leaves_no_hooks_and_marks_the_run_failed(tmp_path):
    model = LinearResidualNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError):
        gradscope.watch(model, tmp_path / "run", optimizer=opt,
                        attribution=Attribution((torch.randn(4, WIDTH + 1), None), every=1))
    assert_no_hooks(model, opt)
    assert gradscope.load_run(tmp_path / "run").status == "failed"


def test_bad_configurations_are_refused_with_a_message():
    with pytest.raises(ValueError, match="method"):
        Attribution(probe(), method="saliency")
    with pytest.raises(ValueError, match="every"):
        Attribution(probe(), every=0)
    with pytest.raises(ValueError, match="pair"):
        Attribution(torch.randn(2, WIDTH))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no watched block"):
        gradscope.watch(gradscope.testing.TinyMLP(), None, blocks=[], attribution=Attribution(probe()))
    with pytest.raises(ValueError, match="no watched block matching"):
        gradscope.watch(LinearResidualNet(), None, attribution=Attribution(probe(), blocks=["nope*"]))
    lm = gradscope.models.create("transformer_lm_pre", depth=1)
    tokens = torch.zeros(2, 32, dtype=torch.long)
    with pytest.raises(ValueError, match="floating-point inputs"):
        gradscope.watch(lm, None, attribution=Attribution((tokens, tokens), method="conductance"))


def test_token_models_and_selected_blocks(tmp_path):
    torch.manual_seed(0)
    lm = gradscope.models.create("transformer_lm_post", depth=2)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32, (3, 32), generator=g)
    targets = tokens.roll(-1, 1)
    targets[:, :10] = -100
    rec = gradscope.watch(lm, tmp_path / "run", attribution=Attribution(
        (tokens, targets), method="integrated_gradients", blocks=["layers.1.*"], n_steps=4))
    rec.close()
    table = gradscope.load_run(tmp_path / "run").attribution
    assert table.block.tolist() == ["layers.1.attn", "layers.1.ffn"]
    assert table[["attr_abs", "branch_share"]].notna().all().all()
    # just before a LayerNorm the first-order split cancels exactly; the shares use absolute values
    assert (table.branch_attr + table.skip_attr).abs().max() < 1e-4 * table.attr_abs.max()
    assert ((table.branch_share > 0) & (table.branch_share < 1)).all()


@pytest.mark.slow
def test_cli_attribution_every(tmp_path):
    out = tmp_path / "runs"
    result = CliRunner().invoke(main, ["run", "resnet20", "--steps", "3", "--every", "1", "--batch-size", "8",
                                       "--attribution-every", "2", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    run = gradscope.load_run(out / "resnet20")
    assert sorted(run.attribution.step.unique()) == [0, 2]
    assert len(run.attribution) == 2 * 9
    bad = CliRunner().invoke(main, ["run", "resnet20", "--attribution-every", "0", "--out", str(out)])
    assert bad.exit_code == 2 and "attribution-every" in bad.output
    tokens = CliRunner().invoke(main, ["run", "transformer_lm_pre", "--steps", "1", "--attribution-every", "1",
                                       "--attribution-method", "conductance", "--out", str(out), "--no-progress"])
    assert tokens.exit_code == 2 and "floating-point inputs" in tokens.output
    assert "Traceback" not in tokens.output
