"""Recorded values agree with a direct float64 computation (docs/design.md, "Metrics")."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope.recording import kernels
from gradscope.recording.layers import with_activations
from gradscope.testing import TinyCNN, TinyMLP, TwiceCalled, batches

RTOL = 1e-4


class Reference:
    """Captures, for chosen modules, every output and dL/dy in float64 with hooks of its own."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.outputs: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
        self.grads: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name):
        def hook(module, inputs, output):
            output = output[0] if isinstance(output, tuple) else output  # what gradscope watches
            self.outputs[name].append(output.detach().double().clone())
            if output.requires_grad:
                output.register_hook(lambda g: self.grads[name].append(g.double().clone()))
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def close(a: float, b: float, scale: float | None = None) -> bool:
    """|a - b| <= RTOL * scale, scale defaulting to |b| (relative agreement)."""
    scale = abs(b) if scale is None else scale
    return abs(a - b) <= RTOL * scale + 1e-12


def record_one_step(model, x, y, run, lr=0.1, **kw):
    """One SGD step under watch(); returns the recorder's run and float64 references."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    rec = gradscope.watch(model, run, optimizer=opt, **kw)
    ref = Reference({layer.name: model.get_submodule(layer.name) for layer in rec.layers})
    params_before, grads_before = {}, {}

    def capture(optimizer, args, kwargs):  # parameters and grads as the update sees them
        for name, m in model.named_modules():
            own = list(m.parameters(recurse=False))
            params_before[name] = math.sqrt(sum(float(p.detach().double().norm() ** 2) for p in own))
            grads_before[name] = math.sqrt(sum(float(p.grad.double().norm() ** 2) for p in own if p.grad is not None))

    h = opt.register_step_pre_hook(capture)
    try:
        with rec:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            rec.step(loss=loss, accuracy=torch.tensor(0.25))
            opt.step()
    finally:
        h.remove()
        ref.close()
    return gradscope.load_run(run), ref, params_before, grads_before, float(loss.detach())


def expected_activation(ys: list[torch.Tensor]) -> dict[str, float]:
    y = torch.cat([t.flatten() for t in ys])
    return {
        "act_mean": float(y.mean()),
        "act_std": float(y.std(unbiased=False)),
        "act_rms": float(y.square().mean().sqrt()),
        "act_absmax": float(y.abs().max()),
        "act_zero_frac": float((y == 0).double().mean()),
    }


@pytest.mark.parametrize("kind", ["mlp", "cnn", "twice"])
def test_layer_columns_match_float64(kind, run_dir):
    torch.manual_seed(0)
    model = {"mlp": TinyMLP, "cnn": TinyCNN, "twice": TwiceCalled}[kind]()
    (x, y), = batches("cnn" if kind == "cnn" else "mlp", steps=1, batch=16)
    run, ref, params, grads, loss = record_one_step(model, x, y, run_dir, modules=with_activations)

    rows = run.layers[(run.layers.step == 0) & (run.layers.phase == "train")].set_index("layer")
    assert set(rows.index) == set(ref.outputs)
    relus = {n for n, m in model.named_modules() if isinstance(m, nn.ReLU)}
    assert relus & set(ref.outputs) or kind == "twice"
    for name, outs in ref.outputs.items():
        got = rows.loc[name]
        want = expected_activation(outs)
        if name not in relus:  # a pre-activation's zero fraction means nothing and is not measured
            assert math.isnan(got["act_zero_frac"]), name
            del want["act_zero_frac"]
        for col, value in want.items():
            scale = want["act_rms"] if col == "act_mean" else None  # mean may be ~0 (after BN)
            assert close(got[col], value, scale), (name, col, got[col], value)
        g = torch.cat([t.flatten() for t in ref.grads[name]])
        assert close(got["grad_out_norm"], float(g.norm())), (name, got["grad_out_norm"], float(g.norm()))
        assert close(got["grad_out_rms"], float(g.square().mean().sqrt()))
        if not list(model.get_submodule(name).parameters(recurse=False)):
            continue  # activation modules: no parameter columns
        assert close(got["param_norm"], params[name])
        assert close(got["grad_norm"], grads[name])
        assert close(got["update_ratio"], 0.1 * grads[name] / params[name])
        assert math.isnan(got["act_sat_frac"])  # no bounded activation is watched here

    if kind == "twice":
        assert run.layer_table.set_index("name").loc["shared", "calls"] == 2
        assert len(ref.outputs["shared"]) == 2

    s = run.scalars.set_index("step").loc[0]
    assert close(s["loss"], loss)
    assert s["accuracy"] == 0.25 and s["lr"] == 0.1
    all_grads = math.sqrt(sum(float(p.grad.double().norm() ** 2) for p in model.parameters()))
    # grads were zeroed by nothing after the step, so they are the step's gradients
    assert close(s["grad_global_norm"], all_grads)
    assert math.isnan(s["loss_scale"])


class Offset(nn.Module):
    """A layer whose output mean is huge against its spread: y = x * 1e-2 + 1e4 (+ shift on call 2)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1e-2))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * self.scale + (1e4 if self.calls % 2 else 1e4 + 0.05)


class TwiceOffset(nn.Module):
    def __init__(self):
        super().__init__()
        self.offset = Offset()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        a = self.offset(x)
        b = self.offset(x)
        return self.head(a + b - 2e4)


def test_variance_accurate_when_mean_dwarfs_spread(run_dir):
    torch.manual_seed(0)
    model = TwiceOffset()
    x = torch.randn(256, 8)
    run, ref, *_ = record_one_step(model, x, torch.randint(0, 4, (256,)), run_dir)
    got = run.layers.set_index("layer").loc["offset"]
    want = expected_activation(ref.outputs["offset"])
    assert want["act_std"] < 1e-5 * want["act_mean"]  # the hard case for float32 sums of squares
    assert close(got["act_std"], want["act_std"]), (got["act_std"], want["act_std"])
    assert close(got["act_mean"], want["act_mean"])
    # The naive float32 formula really does fail here, so the test can tell the difference.
    y32 = torch.cat([t.float().flatten() for t in ref.outputs["offset"]])
    naive = float((y32.square().mean() - y32.mean().square()).clamp_min(0).sqrt())
    assert not close(naive, want["act_std"])


def test_saturation_fraction_of_bounded_activations(run_dir):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Sigmoid(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 32), nn.Hardtanh(-0.5, 0.5), nn.Linear(32, 4))
    with torch.no_grad():
        model[0].weight.mul_(20)  # push the sigmoid into saturation
    x = torch.randn(64, 8)
    run, ref, *_ = record_one_step(model, x, torch.randint(0, 4, (64,)), run_dir,
                                   modules=[nn.Linear, nn.Sigmoid, nn.Tanh, nn.Hardtanh])
    rows = run.layers.set_index("layer")
    bounds = {"1": (0.0, 1.0), "3": (-1.0, 1.0), "5": (-0.5, 0.5)}
    for name, (lo, hi) in bounds.items():
        y = torch.cat([t.flatten() for t in ref.outputs[name]])
        margin = 0.01 * (hi - lo)
        want = float(((y <= lo + margin) | (y >= hi - margin)).double().mean())
        assert abs(rows.loc[name, "act_sat_frac"] - want) < 1e-6, name
    assert rows.loc["1", "act_sat_frac"] > 0.3  # the setup really saturates
    assert math.isnan(rows.loc["0", "act_sat_frac"])  # Linear: not a bounded activation
    # parameter-free modules have no parameter columns
    assert math.isnan(rows.loc["1", "param_norm"]) and math.isnan(rows.loc["1", "grad_norm"])


def test_dead_units_counted_as_zero_fraction(run_dir):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every unit dead
    run, *_ = record_one_step(model, torch.randn(32, 8), torch.randint(0, 4, (32,)), run_dir,
                              modules=["0", "1", "2"])
    rows = run.layers.set_index("layer")
    assert rows.loc["1", "act_zero_frac"] == 1.0
    assert math.isnan(rows.loc["0", "act_zero_frac"])  # a pre-activation: not measured


def test_step_without_optimizer_records_parameters_and_scalars(run_dir):
    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches("mlp", steps=3)
    with gradscope.watch(model, run_dir) as rec:
        for x, y in data:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            rec.step(loss=loss, accuracy=0.5)
            opt.step()
    run = gradscope.load_run(run_dir)
    assert list(run.scalars.step) == [0, 1, 2]
    assert run.scalars.accuracy.eq(0.5).all()
    assert run.scalars.lr.isna().all()  # unknown without an optimizer
    train_rows = run.layers[run.layers.phase == "train"]
    assert train_rows.groupby("step").size().tolist() == [4, 4, 4]
    assert train_rows.update_ratio.isna().all() and train_rows.grad_norm.gt(0).all()


def test_loss_scale_recorded_and_gradients_unscaled(run_dir):
    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    (x, y), = batches("mlp", steps=1)
    ref = Reference({"0": model[0]})
    grads = {}
    h = opt.register_step_pre_hook(lambda o, a, k: grads.update(
        g0=float(model[0].weight.grad.double().norm() ** 2 + model[0].bias.grad.double().norm() ** 2) ** 0.5))
    with gradscope.watch(model, run_dir, optimizer=opt, scaler=scaler):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    h.remove()
    ref.close()
    run = gradscope.load_run(run_dir)
    s = run.scalars.set_index("step").loc[0]
    assert s["loss_scale"] == 1024.0
    row = run.layers.set_index("layer").loc["0"]
    scaled_grad_out = float(torch.cat([g.flatten() for g in ref.grads["0"]]).norm())
    assert close(row["grad_out_norm"], scaled_grad_out / 1024.0)
    assert close(row["grad_norm"], grads["g0"])  # the optimizer saw unscaled gradients


def _large_inputs():
    torch.manual_seed(0)
    n = 200_000
    outlier_first = torch.randn(n)
    outlier_first[0] = 1e3  # the shift's sample includes element 0: it must not spoil the variance
    return {
        "standard": torch.randn(n),
        "huge mean, tiny spread": 1e4 + 1e-2 * torch.randn(n),
        "negative mean": -50 + torch.randn(n),
        "relu": torch.relu(torch.randn(n) + 0.2),
        "outlier first": outlier_first,
        "constant": torch.full((n,), 3.0),
        "4-d": torch.randn(32, 16, 20, 20) * 3 + 1,
    }


@pytest.mark.parametrize("kind", list(_large_inputs()))
def test_fast_cpu_moments_of_large_tensors_match_float64(kind):
    """Large CPU tensors take the shifted one-pass formula and the dot-product norm."""
    from gradscope.recording.moments import _SHIFTED_MIN, Scratch, activation_moments, norm32
    from gradscope.store.schema import ACT_ABSMAX, ACT_MEAN, ACT_VAR

    y = _large_inputs()[kind]
    assert y.numel() >= _SHIFTED_MIN  # the fast path is the one under test
    parts = activation_moments(y, None, False)
    y64 = y.double()
    mean, var = float(y64.mean()), float(y64.var(unbiased=False))
    rms = float(y64.square().mean().sqrt())
    assert abs(float(parts[ACT_MEAN]) - mean) <= RTOL * rms, (float(parts[ACT_MEAN]), mean)
    assert abs(float(parts[ACT_VAR]) - var) <= RTOL * var + 1e-12, (float(parts[ACT_VAR]), var)
    assert float(parts[ACT_ABSMAX]) == float(y64.abs().max())
    assert close(float(norm32(y)), float(y64.norm()))
    out = torch.zeros(())
    norm32(y, out=out)
    assert close(float(out), float(y64.norm()))
    # the recorder's reusable work vector changes nothing (and is reused across sizes)
    scratch = Scratch()
    scratch.take(10 * y.numel(), y).fill_(float("nan"))
    assert torch.equal(torch.stack(activation_moments(y, None, False, scratch)), torch.stack(parts))


def test_work_vector_lives_during_forwards_only(run_dir, monkeypatch):
    """The CPU work vector is released when the model's forward ends, before backward's peak."""
    monkeypatch.setattr(kernels, "MODE", None)  # the CPU's immediate path, even in a batched test run
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 4))
    x, y = torch.randn(64, 64), torch.randint(0, 4, (64,))
    seen = []
    model[2].register_forward_hook(lambda m, a, o: seen.append(rec._sink.scratch._buf is not None))
    with gradscope.watch(model, run_dir, modules=with_activations) as rec:
        loss = F.cross_entropy(model(x), y)
        assert rec._sink.scratch._buf is None
        loss.backward()
        rec.step(loss=loss)
    assert seen == [True]  # in use by the first layers' probes (64 x 512 outputs take the fast path)


class InPlaceAndSplit(nn.Module):
    """Outputs modified in place after their layer (ReLU(inplace), +=), and a layer whose output
    is one of several outputs of one autograd node (chunk), one of them unused by the loss."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(16, 16)
        self.split = Chunk()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.act(self.norm(self.fc1(x)))  # norm's output is overwritten by the ReLU
        out = self.fc2(h)
        out += h  # fc2's output is overwritten by the residual sum
        used, _unused = self.split(out)
        return self.head(used)


class Chunk(nn.Module):
    def forward(self, x):
        first, second = x.chunk(2, dim=1)  # two outputs of one node: the watched one is output 1
        return second, first  # and output 0 gets no gradient


def test_gradients_of_outputs_modified_in_place_or_split(run_dir):
    torch.manual_seed(0)
    model = InPlaceAndSplit()
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    run, ref, *_ = record_one_step(model, x, y, run_dir, modules=["fc1", "norm", "fc2", "split", "head"])
    rows = run.layers[run.layers.phase == "train"].set_index("layer")
    for name in ("fc1", "norm", "fc2", "split", "head"):
        g = torch.cat([t.flatten() for t in ref.grads[name]])
        assert close(rows.loc[name, "grad_out_norm"], float(g.norm())), (name, rows.loc[name, "grad_out_norm"])
