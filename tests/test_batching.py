"""Batched reductions (the GPU path): held outputs and gradients give the same statistics.

On a CPU the batcher is forced on with ``kernels.MODE = "torch"`` (the kernels' arithmetic in
torch ops); the Triton kernels themselves are checked against float64 in Triton's interpreter
when Triton is installed, and on a GPU by tests/test_cuda.py.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope import models
from gradscope.recording import batching, kernels
from gradscope.testing import TinyCNN, TinyMLP, TwiceCalled


class Bounded(nn.Module):
    """Tanh (saturation counted) and ReLU6 layers, a shape for the channels-last path."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.tanh = nn.Tanh()
        self.relu6 = nn.ReLU6()
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu6(self.tanh(self.conv(x.contiguous(memory_format=torch.channels_last)) * 3) * 4)
        return self.head(h.mean(dim=(2, 3)))


def _model(kind: str) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind in ("resnet20", "transformer_lm_pre"):
        overrides = {"depth": 2} if kind == "transformer_lm_pre" else {}
        model = models.create(kind, **overrides)
        data = [models.example_input(kind, batch=4, seed=i, **overrides) for i in range(4)]
        return model, data
    model = {"cnn": TinyCNN, "mlp": TinyMLP, "twice": TwiceCalled, "bounded": Bounded}[kind]()
    shape = (6, 3, 8, 8) if kind in ("cnn", "bounded") else (6, 8)
    return model, [(torch.randn(shape, generator=g), torch.randint(0, 4, (6,), generator=g)) for _ in range(4)]


def _train(model, data, run=None, **kwargs):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = gradscope.watch(model, run, optimizer=opt, **kwargs) if run is not None else None
    for x, y in data:
        opt.zero_grad()
        out = model(x)
        F.cross_entropy(out.flatten(0, -2), y.flatten()).backward()
        opt.step()
    if rec is not None:
        rec.close()
    return rec


def _assert_same_tables(a: gradscope.Run, b: gradscope.Run) -> None:
    for table in ("layers", "blocks"):
        x, y = getattr(a, table), getattr(b, table)
        assert list(x.columns) == list(y.columns) and len(x) == len(y), table
        for column in x.columns:
            if x[column].dtype.kind == "f":
                np.testing.assert_allclose(y[column].to_numpy(), x[column].to_numpy(), rtol=2e-5, atol=1e-7,
                                           err_msg=f"{table}.{column}")
            else:
                assert x[column].tolist() == y[column].tolist(), f"{table}.{column}"


@pytest.mark.parametrize("kind", ["cnn", "mlp", "twice", "bounded", "resnet20", "transformer_lm_pre"])
def test_batched_statistics_equal_immediate_ones_and_training_is_untouched(kind, tmp_path, monkeypatch):
    base, data = _model(kind)
    plain = copy.deepcopy(base)
    _train(plain, data)
    immediate = copy.deepcopy(base)
    _train(immediate, data, tmp_path / "immediate")
    monkeypatch.setattr(kernels, "MODE", "torch")
    batched = copy.deepcopy(base)
    rec = _train(batched, data, tmp_path / "batched")
    assert rec._batcher is not None and rec._batcher.holdable  # held and reduced together
    _assert_same_tables(gradscope.load_run(tmp_path / "immediate"), gradscope.load_run(tmp_path / "batched"))
    for key, value in plain.state_dict().items():
        assert torch.equal(value, batched.state_dict()[key]), key


def test_outputs_changed_in_place_are_never_held(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "MODE", "torch")
    model, data = _model("cnn")
    rec = _train(model, data, tmp_path / "r")
    names = {layer.row: layer.name for layer in rec.layers}
    # BatchNorm outputs are overwritten by ReLU(inplace=True): learned at step 0, never held
    assert {names[r] for r in rec._batcher.immediate} == {"features.1", "features.4"}
    assert {names[r] for r in rec._batcher.holdable} == {"features.0", "features.3", "head"}


class Clobbered(nn.Module):
    """A layer whose output the parent overwrites in place, but only from step ``after`` on (and
    only at that step, unless ``twice``: then the layer runs twice per forward and its first
    output is overwritten before the second call at every step from ``after`` on)."""

    def __init__(self, after: int, twice: bool = False) -> None:
        super().__init__()
        self.lin, self.head, self.after, self.calls, self.twice = nn.Linear(8, 8), nn.Linear(8, 4), after, 0, twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.training and (self.calls >= self.after if self.twice else self.calls == self.after):
            h.mul_(2)  # allowed by autograd: Linear's backward does not need its output
        if self.twice:
            h = h + self.lin(x * 3)
        self.calls += 1
        return self.head(torch.relu(h))


def test_a_held_output_changed_later_is_dropped_not_recorded_wrong(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "MODE", "torch")
    torch.manual_seed(0)
    model = Clobbered(after=1)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(6, 8, generator=g), torch.randint(0, 4, (6,), generator=g)) for _ in range(3)]
    outputs = []
    model.lin.register_forward_hook(lambda m, i, o: outputs.append(o.detach().double().clone()))
    rec = _train(model, data, tmp_path / "r")
    lin = gradscope.load_run(tmp_path / "r").layers.query("layer == 'lin' and phase == 'train'").set_index("step")
    assert np.isnan(lin.loc[1, "act_mean"]) and np.isnan(lin.loc[1, "act_std"])  # the clobbered call: dropped
    for step in (0, 2):  # learned at 0, then immediate again after the surprise
        assert lin.loc[step, "act_mean"] == pytest.approx(float(outputs[step].mean()), rel=1e-5)
        assert lin.loc[step, "act_std"] == pytest.approx(float(outputs[step].std(unbiased=False)), rel=1e-5)
    assert lin.grad_out_norm.notna().all()  # gradients are unaffected
    assert [layer.name for layer in rec.layers if layer.row in rec._batcher.immediate] == ["lin"]


def test_a_dropped_first_call_leaves_the_second_recorded_alone(tmp_path, monkeypatch):
    """The second call of a layer whose held first call was changed in place is recorded as the
    step's only call: its own moments and count, not merged with a call that was dropped."""
    monkeypatch.setattr(kernels, "MODE", "torch")
    torch.manual_seed(0)
    model = Clobbered(after=1, twice=True)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(6, 8, generator=g), torch.randint(0, 4, (6,), generator=g)) for _ in range(2)]
    outputs = []
    model.lin.register_forward_hook(lambda m, i, o: outputs.append(o.detach().double().clone()))
    _train(model, data, tmp_path / "r")
    lin = gradscope.load_run(tmp_path / "r").layers.query("layer == 'lin' and phase == 'train'").set_index("step")
    both = torch.cat([outputs[0], outputs[1]])  # step 0: nothing changed, the two calls merged
    assert lin.loc[0, "act_mean"] == pytest.approx(float(both.mean()), rel=1e-5)
    assert lin.loc[0, "act_std"] == pytest.approx(float(both.std(unbiased=False)), rel=1e-5)
    second = outputs[3]  # step 1: the first call (held, then doubled in place) is dropped
    assert lin.loc[1, "act_mean"] == pytest.approx(float(second.mean()), rel=1e-5)
    assert lin.loc[1, "act_std"] == pytest.approx(float(second.std(unbiased=False)), rel=1e-5)
    assert lin.loc[1, "act_absmax"] == pytest.approx(float(second.abs().max()), rel=1e-5)


class BranchAddedInPlace(nn.Module):
    """A residual block y = F(x) + x. From step ``after`` on (only at that step, unless ``always``)
    it adds x to F(x) in place, as torchvision's BasicBlock does (``out += identity``): the
    branch's output no longer holds F(x) at the forward's end."""

    def __init__(self, after: int, always: bool = False) -> None:
        super().__init__()
        self.branch, self.after, self.always, self.calls = nn.Linear(8, 8), after, always, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.branch(x)
        in_place = self.training and (self.calls >= self.after if self.always else self.calls == self.after)
        self.calls += 1
        return f.add_(x) if in_place else f + x


class WithBranch(nn.Module):
    """``BranchAddedInPlace`` declared as a block with its branch, then a head."""

    def __init__(self, after: int, always: bool = False) -> None:
        super().__init__()
        self.block, self.head = BranchAddedInPlace(after, always), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.block(x)))

    def gradscope_blocks(self):
        return [gradscope.BlockSpec("block", branch="block.branch")]


def _branch_model(after: int, always: bool = False) -> tuple[nn.Module, list[float]]:
    """A ``WithBranch`` and the list its block's true ||F(x)|| / ||x|| go to at each forward."""
    torch.manual_seed(0)
    model = WithBranch(after, always)
    ratios: list[float] = []
    model.block.branch.register_forward_hook(
        lambda m, i, o: ratios.append(float(o.detach().double().norm() / i[0].double().norm())))
    return model, ratios


@pytest.mark.parametrize("always", [True, False])
def test_a_branch_output_changed_in_place_is_never_recorded_wrong(always, tmp_path, monkeypatch):
    """A branch whose F(x) survives the forward is held (one launch for many blocks); one that the
    block overwrites is reduced at once, and a held one overwritten later is dropped for that step."""
    monkeypatch.setattr(kernels, "MODE", "torch")
    model, ratios = _branch_model(after=0 if always else 1, always=always)
    data = [(torch.randn(6, 8), torch.randint(0, 4, (6,))) for _ in range(3)]
    rec = _train(model, data, tmp_path / "r")
    got = gradscope.load_run(tmp_path / "r").blocks.set_index("step").branch_ratio
    key = len(rec.layers)  # the block's branch, as the batcher learns it
    if always:  # learned at step 0: reduced at once every step, never lost
        assert got.tolist() == pytest.approx(ratios, rel=1e-5)
        assert key in rec._batcher.immediate
    else:  # held from step 1, overwritten there: that step's ratio is missing, not wrong
        assert np.isnan(got[1]) and got[[0, 2]].tolist() == pytest.approx([ratios[0], ratios[2]], rel=1e-5)
        assert key in rec._batcher.immediate


def test_a_branch_output_left_alone_is_held(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "MODE", "torch")
    model, ratios = _branch_model(after=99)
    data = [(torch.randn(6, 8), torch.randint(0, 4, (6,))) for _ in range(3)]
    rec = _train(model, data, tmp_path / "r")
    assert len(rec.layers) in rec._batcher.holdable
    got = gradscope.load_run(tmp_path / "r").blocks.set_index("step").branch_ratio
    assert got.tolist() == pytest.approx(ratios, rel=1e-5)


def test_holding_little_memory_reduces_early_with_the_same_results(tmp_path, monkeypatch):
    model, data = _model("resnet20")
    monkeypatch.setattr(kernels, "MODE", "torch")
    _train(copy.deepcopy(model), data, tmp_path / "default")
    calls = []
    reduce = kernels.reduce_moments_by_torch
    monkeypatch.setattr(kernels, "reduce_moments_by_torch", lambda t, *a: (calls.append(len(t)), reduce(t, *a)))
    monkeypatch.setattr(batching, "HOLD_BYTES", 1)  # every tensor reduced as soon as it is held
    _train(copy.deepcopy(model), data, tmp_path / "early")
    assert calls and max(calls) == 1
    _assert_same_tables(gradscope.load_run(tmp_path / "default"), gradscope.load_run(tmp_path / "early"))


def test_a_failing_kernel_falls_back_to_torch_once_with_a_warning(tmp_path, monkeypatch):
    model, data = _model("mlp")
    _train(copy.deepcopy(model), data, tmp_path / "immediate")

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(kernels, "MODE", "torch")
    monkeypatch.setattr(kernels, "uses_triton", lambda device: True)
    monkeypatch.setattr(kernels, "reduce_moments", broken)
    monkeypatch.setattr(kernels, "reduce_moment", broken)
    monkeypatch.setattr(kernels, "reduce_squares", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(copy.deepcopy(model), data, tmp_path / "fallback")
    assert [str(w.message) for w in caught if "kernel failed" in str(w.message)] == [
        "gradscope: batched statistics kernel failed (RuntimeError: no compiler); "
        "reducing tensors one at a time from now on"]
    _assert_same_tables(gradscope.load_run(tmp_path / "immediate"), gradscope.load_run(tmp_path / "fallback"))


def test_batching_is_on_for_cuda_with_triton_unless_the_environment_says_no(monkeypatch):
    monkeypatch.setattr(kernels, "MODE", None)
    monkeypatch.setattr(kernels, "triton_available", lambda device: device.type == "cuda")
    monkeypatch.delenv("GRADSCOPE_BATCHING", raising=False)
    assert batching.enabled(torch.device("cuda")) and not batching.enabled(torch.device("cpu"))
    monkeypatch.setenv("GRADSCOPE_BATCHING", "0")
    assert not batching.enabled(torch.device("cuda"))
    monkeypatch.setattr(kernels, "MODE", "torch")  # tests force it on anywhere
    assert batching.enabled(torch.device("cpu"))


_KERNEL_CHECK = textwrap.dedent("""
    import torch
    from gradscope.recording import kernels
    kernels.MODE = "triton"
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)
    ys = [r(3000) * 2 + 5, torch.relu(r(4, 16, 8, 8)), r(10000) * 1e-2 + 1e4, r(9000).tanh() * 1.02,
          r(20000).to(torch.bfloat16), r(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
          r(5).half(), torch.tensor([1.0, float("nan"), -3.0])]
    rows = [0, 1, 0, 2, 0, 0, 0, 1]
    params = [[0, 0, 0, float("inf")], [1, 0, 0, float("inf")], [0, 1, 0.0, 0.98]]
    ys[-1] = ys[-1].to(DEVICE)
    acc = torch.zeros(len(ys), 6, device=DEVICE)
    kernels.reduce_moments(ys, [6 * i for i in range(len(ys))], rows, torch.tensor(params, device=DEVICE), acc)
    got = kernels.finish_moments(acc).double()
    for y, row, out in zip(ys, rows, got.cpu()):
        y = y.double().flatten().cpu()
        want = torch.stack([y.mean(), y.var(correction=0), y.abs().max(),
                            (y != 0).sum().double() if params[row][0] else torch.tensor(0.0).double(),
                            (y.abs() >= 0.98).sum().double() if params[row][1] else torch.tensor(0.0).double()])
        if y.isnan().any():
            assert out[:3].isnan().all() and out[3] == 3, out
            continue
        assert torch.allclose(out, want, rtol=1e-5, atol=1e-6 * float(y.abs().max())), (out, want)
    sq = torch.zeros(2, device=DEVICE)
    kernels.reduce_squares([ys[0], ys[1], ys[4]], [0, 1, 1], sq)
    want = [ys[0].double().square().sum(), ys[1].double().square().sum() + ys[4].double().square().sum()]
    assert torch.allclose(sq.double(), torch.stack(want), rtol=1e-5), (sq, want)
    many = [r(int(n)) for n in torch.randint(1, 20000, (19,), generator=g)]  # three launches of up to 8
    sq = torch.zeros(19, device=DEVICE)
    kernels.reduce_squares(many, list(range(19)), sq)
    want = torch.stack([t.double().square().sum() for t in many])
    assert torch.allclose(sq.double(), want, rtol=1e-5), (sq, want)
    acc = torch.zeros(19, 6, device=DEVICE)
    kernels.reduce_moments(many, [6 * i for i in range(19)], [0] * 19, torch.tensor(params, device=DEVICE), acc)
    got_many = kernels.finish_moments(acc).double()
    want = torch.stack([torch.stack([t.double().mean(), t.double().var(correction=0)]) for t in many])
    assert torch.allclose(got_many[:, :2], want, rtol=1e-4, atol=1e-6), (got_many, want)
    x, y = r(5, 3, 7, 9), r(5, 3, 7, 9)  # per-sample squares of a block's input and output
    for a, b in ((x, y), (x, x.clone()), (x.to(torch.bfloat16), y)):
        out = torch.zeros(3, 5, device=DEVICE)
        kernels.sample_squares(a, b, out)
        a64, b64 = a.double().reshape(5, -1), b.double().reshape(5, -1)
        want = torch.stack([(b64 - a64).square().sum(1), a64.square().sum(1), b64.square().sum(1)])
        assert torch.allclose(out.double().cpu(), want.cpu(), rtol=1e-5), (out, want)
    out = torch.zeros(3, 5, device=DEVICE)
    kernels.sample_squares(x, x.clone(), out)
    assert (out[0] == 0).all()  # an exact identity gives exactly 0
    acc = torch.zeros(3, 6, device=DEVICE)  # one tensor, launched on its own
    kernels.reduce_moment(ys[1], 6, 1, torch.tensor(params, device=DEVICE), acc)
    one = kernels.finish_moments(acc[1:2])[0].double().cpu()
    assert torch.allclose(one, got[1].cpu(), rtol=1e-5), (one, got[1])
    blocks = [(r(5, 7, 16), r(5, 7, 16)), (r(7, 5, 100).transpose(0, 1), r(7, 5, 100).transpose(0, 1)),
              (r(3, 9, 24), r(3, 9, 24).to(torch.bfloat16)), (r(2, 300, 2048), r(2, 300, 2048)),
              (r(2, 3, 5000), r(2, 3, 5000)), (r(2, 4, 8), torch.cat([r(2, 3, 8), torch.zeros(2, 1, 8, device=DEVICE)], 1))]
    blocks.append((blocks[0][1], blocks[0][1].clone()))  # an exact identity
    for x, y in blocks:  # a block's token directions summed per sample, with or without its input
        for pair in (False, True):
            sums = torch.zeros(y.shape[0], y.shape[2], device=DEVICE)
            squares = torch.zeros(3, y.shape[0], device=DEVICE) if pair else None
            kernels.block_sums(x if pair else None, y, squares, sums)
            x64, y64 = x.double(), y.double()
            want = (y64 / y64.norm(dim=-1, keepdim=True).clamp_min(1e-12)).sum(dim=1)
            assert torch.allclose(sums.double().cpu(), want.cpu(), rtol=1e-5, atol=1e-5), (y.shape, sums, want)
            if pair:
                want = torch.stack([(y64 - x64).square().sum((1, 2)), x64.square().sum((1, 2)), y64.square().sum((1, 2))])
                assert torch.allclose(squares.double().cpu(), want.cpu(), rtol=1e-5), (y.shape, squares, want)
    assert (squares[0] == 0).all()  # the exact identity's ||y - x||^2 is exactly 0
    kernels.MODE = None
    print("ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its CPU interpreter)")
def test_triton_kernels_match_float64_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", "DEVICE = 'cpu'\n" + _KERNEL_CHECK], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


_COMPILE_CHECK = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from gradscope.recording import kernels, triton_kernels as tk

    POINTERS = {"row_params", "acc", "out", "squares", "sums", "x", "y"} | {f"{p}{i}" for p in "yg" for i in range(8)}
    CONSTANTS = {"BLOCK": kernels._BLOCK, "ITERS": kernels._ITERS, "SAMPLES": kernels._SHIFT_SAMPLES}

    def check(kernel, dtype, num_warps=4, **constants):
        signature = {}
        for param in kernel.params:
            name = param.name
            if param.is_constexpr:
                signature[name] = "constexpr"
            elif name in POINTERS:
                signature[name] = "*fp32" if name in ("row_params", "acc", "out", "squares", "sums") else "*" + dtype
            else:
                signature[name] = "i64" if name.endswith(("_b", "_t")) else "i32"
        constants = {k: v for k, v in {**CONSTANTS, **constants}.items() if k in signature}
        for arch in (80, 90):
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                      target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
            assert compiled.asm["cubin"], (kernel, dtype, arch)

    for dtype in ("fp32", "bf16", "fp16"):
        for kernel in (tk.moments, tk.moments_one, tk.squares, tk.sample_squares):
            check(kernel, dtype)
        for block_d, rows in ((1, 4096), (512, 8), (8192, 1)):
            for pair in (True, False):
                check(tk.block_sums, dtype, kernels.TOKEN_WARPS, BLOCK_D=block_d, ROWS=rows, TILES=2, PAIR=pair)
    print("ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_triton_kernels_compile_for_gpus():
    """Every kernel compiles to machine code for sm_80 and sm_90, for each dtype it is launched
    with: Triton's compiler needs no GPU, and the interpreter does not check what it refuses."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernels_match_float64_on_cuda():
    if not kernels.triton_available(torch.device("cuda")):
        pytest.skip("needs Triton")
    exec(compile(_KERNEL_CHECK, "kernel_check", "exec"), {"DEVICE": "cuda"})
