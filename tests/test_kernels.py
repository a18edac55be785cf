"""The Triton kernels against float64, and compiled for the GPUs they are launched on.

The kernels run where Triton does: on a CUDA GPU, or on the CPU in Triton's interpreter. The
interpreter must be switched on before triton is first imported, so the CPU variants run in a
fresh pytest process on this module (``test_in_a_fresh_process[interpreter]`` starts it; by hand:
``TRITON_INTERPRET=1 GRADSCOPE_KERNEL_DEVICE=cpu pytest tests/test_kernels.py``).

Compiling needs no GPU: every kernel is compiled to a cubin for sm_80 and sm_90 in each dtype it
is launched with, which catches what the interpreter accepts but the compiler refuses (e.g. a
loop-carried int accumulator). Everything here is skipped where Triton is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gradscope.recording import kernels

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
#: Where this process runs the kernels: "cuda" (skipped without a GPU), or "cpu", which needs
#: Triton's interpreter (TRITON_INTERPRET=1 from the start).
DEVICE = os.environ.get("GRADSCOPE_KERNEL_DEVICE", "cuda")

# What reduce_moments is given: a row of the parameter table per tensor (count zeros, has
# bounds, middle, saturation threshold), and which row each of the test tensors uses.
PARAMS = [[0, 0, 0, float("inf")], [1, 0, 0, float("inf")], [0, 1, 0.0, 0.98]]
ROWS = [0, 1, 0, 2, 0, 0, 0, 1]
COLS = kernels.N_MOMENT_COLS

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")


@pytest.fixture(params=[pytest.param(DEVICE, marks=[pytest.mark.cuda] if DEVICE == "cuda" else [])])
def device(request, monkeypatch) -> torch.device:
    """The device the kernels run on, with ``kernels.MODE = "triton"`` (any device) meanwhile."""
    if not HAS_TRITON:
        pytest.skip("needs Triton")
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA (the CPU variants run in Triton's interpreter, in a fresh process)")
    if request.param == "cpu" and not INTERPRETED:
        pytest.fail("GRADSCOPE_KERNEL_DEVICE=cpu needs TRITON_INTERPRET=1, set before triton is imported")
    monkeypatch.setattr(kernels, "MODE", "triton")
    return torch.device(request.param)


@pytest.fixture
def data(device) -> SimpleNamespace:
    """The test tensors, drawn from one seeded generator in one order on the CPU, then moved."""
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    ys = [r(3000) * 2 + 5, torch.relu(r(4, 16, 8, 8)), r(10000) * 1e-2 + 1e4, r(9000).tanh() * 1.02,
          r(20000).to(torch.bfloat16), r(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
          r(5).half(), torch.tensor([1.0, float("nan"), -3.0]).to(device)]
    many = [r(int(n)) for n in torch.randint(1, 20000, (19,), generator=g)]  # three launches of up to 8
    x, y = r(5, 3, 7, 9), r(5, 3, 7, 9)  # per-sample squares of a block's input and output
    blocks = [(r(5, 7, 16), r(5, 7, 16)), (r(7, 5, 100).transpose(0, 1), r(7, 5, 100).transpose(0, 1)),
              (r(3, 9, 24), r(3, 9, 24).to(torch.bfloat16)), (r(2, 300, 2048), r(2, 300, 2048)),
              (r(2, 3, 5000), r(2, 3, 5000)),
              (r(2, 4, 8), torch.cat([r(2, 3, 8), torch.zeros(2, 1, 8, device=device)], 1))]
    blocks.append((blocks[0][1], blocks[0][1].clone()))  # an exact identity, last
    return SimpleNamespace(ys=ys, many=many, x=x, y=y, blocks=blocks,
                           params=torch.tensor(PARAMS, device=device))


def _moments(tensors: list[torch.Tensor], rows: list[int], params: torch.Tensor) -> torch.Tensor:
    """``finish_moments`` of one ``reduce_moments`` call over ``tensors``, in float64."""
    acc = torch.zeros(len(tensors), COLS, device=params.device)
    kernels.reduce_moments(tensors, [COLS * i for i in range(len(tensors))], rows, params, acc)
    return kernels.finish_moments(acc).double()


def test_moments_match_float64(device, data):
    got = _moments(data.ys, ROWS, data.params)
    for y, row, out in zip(data.ys, ROWS, got.cpu()):
        y = y.double().flatten().cpu()
        want = torch.stack([y.mean(), y.var(correction=0), y.abs().max(),
                            (y != 0).sum().double() if PARAMS[row][0] else torch.tensor(0.0).double(),
                            (y.abs() >= 0.98).sum().double() if PARAMS[row][1] else torch.tensor(0.0).double()])
        if y.isnan().any():
            assert out[:3].isnan().all() and out[3] == 3, out
            continue
        assert torch.allclose(out, want, rtol=1e-5, atol=1e-6 * float(y.abs().max())), (out, want)


def test_moments_of_one_tensor_equal_its_row_of_a_batched_launch(device, data):
    got = _moments(data.ys, ROWS, data.params)
    acc = torch.zeros(3, COLS, device=device)  # one tensor, launched on its own
    kernels.reduce_moment(data.ys[1], COLS, 1, data.params, acc)
    one = kernels.finish_moments(acc[1:2])[0].double().cpu()
    assert torch.allclose(one, got[1].cpu(), rtol=1e-5), (one, got[1])


def test_moments_over_several_launches_match_float64(device, data):
    got = _moments(data.many, [0] * len(data.many), data.params)
    want = torch.stack([torch.stack([t.double().mean(), t.double().var(correction=0)]) for t in data.many])
    assert torch.allclose(got[:, :2], want, rtol=1e-4, atol=1e-6), (got, want)


def test_squares_match_float64(device, data):
    ys = data.ys
    sq = torch.zeros(2, device=device)
    kernels.reduce_squares([ys[0], ys[1], ys[4]], [0, 1, 1], sq)
    want = [ys[0].double().square().sum(), ys[1].double().square().sum() + ys[4].double().square().sum()]
    assert torch.allclose(sq.double(), torch.stack(want), rtol=1e-5), (sq, want)
    sq = torch.zeros(len(data.many), device=device)  # three launches of up to 8
    kernels.reduce_squares(data.many, list(range(len(data.many))), sq)
    want = torch.stack([t.double().square().sum() for t in data.many])
    assert torch.allclose(sq.double(), want, rtol=1e-5), (sq, want)


def test_sample_squares_match_float64(device, data):
    x, y = data.x, data.y
    for a, b in ((x, y), (x, x.clone()), (x.to(torch.bfloat16), y)):
        out = torch.zeros(3, 5, device=device)
        kernels.sample_squares(a, b, out)
        a64, b64 = a.double().reshape(5, -1), b.double().reshape(5, -1)
        want = torch.stack([(b64 - a64).square().sum(1), a64.square().sum(1), b64.square().sum(1)])
        assert torch.allclose(out.double().cpu(), want.cpu(), rtol=1e-5), (out, want)
    out = torch.zeros(3, 5, device=device)
    kernels.sample_squares(x, x.clone(), out)
    assert (out[0] == 0).all()  # an exact identity gives exactly 0


@pytest.mark.parametrize("pair", [False, True], ids=["output", "with_input"])
def test_block_sums_match_float64(pair, device, data):
    """A block's token directions summed per sample, alone or with its input's squares."""
    for x, y in data.blocks:
        sums = torch.zeros(y.shape[0], y.shape[2], device=device)
        squares = torch.zeros(3, y.shape[0], device=device) if pair else None
        kernels.block_sums(x if pair else None, y, squares, sums)
        x64, y64 = x.double(), y.double()
        want = (y64 / y64.norm(dim=-1, keepdim=True).clamp_min(1e-12)).sum(dim=1)
        assert torch.allclose(sums.double().cpu(), want.cpu(), rtol=1e-5, atol=1e-5), (y.shape, sums, want)
        if pair:
            want = torch.stack([(y64 - x64).square().sum((1, 2)), x64.square().sum((1, 2)), y64.square().sum((1, 2))])
            assert torch.allclose(squares.double().cpu(), want.cpu(), rtol=1e-5), (y.shape, squares, want)
    if pair:
        assert (squares[0] == 0).all()  # the exact identity's ||y - x||^2 is exactly 0


# Compiling: the kernels' signatures, as the launches in kernels.py give them.
POINTERS = {"row_params", "acc", "out", "squares", "sums", "x", "y"} | {f"{p}{i}" for p in "yg" for i in range(8)}
FLOAT32_POINTERS = {"row_params", "acc", "out", "squares", "sums"}
BLOCK_SUMS_SHAPES = [(1, 4096), (512, 8), (8192, 1)]  # (BLOCK_D, ROWS): narrow, medium, widest


def _compile(kernel, dtype: str, num_warps: int = 4, **constants) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = "*fp32" if name in FLOAT32_POINTERS else "*" + dtype
        else:
            signature[name] = "i64" if name.endswith(("_b", "_t")) else "i32"
    defaults = {"BLOCK": kernels._BLOCK, "ITERS": kernels._ITERS, "SAMPLES": kernels.SHIFT_SAMPLES}
    constants = {k: v for k, v in {**defaults, **constants}.items() if k in signature}
    for arch in (80, 90):
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                  target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        assert compiled.asm["cubin"], (kernel, dtype, arch)


@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="the interpreter replaces the jitted kernels; "
                                        "compiled in a fresh process by test_in_a_fresh_process[compiler]")
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", ["moments", "moments_one", "squares", "sample_squares",
                                  pytest.param("block_sums", marks=pytest.mark.slow)])  # six builds, ~6 s uncached
def test_kernel_compiles_for_gpus(name, dtype):
    """Compiles to machine code for sm_80 and sm_90 in ``dtype``; Triton's compiler needs no GPU."""
    from gradscope.recording import triton_kernels

    kernel = getattr(triton_kernels, name)
    if name != "block_sums":
        _compile(kernel, dtype)
        return
    for block_d, rows in BLOCK_SUMS_SHAPES:  # built as kernels.block_sums builds it
        for pair in (True, False):
            _compile(kernel, dtype, kernels.TOKEN_WARPS, BLOCK_D=block_d, ROWS=rows, TILES=2, PAIR=pair)


# Variants that need a process of their own: Triton reads TRITON_INTERPRET when first imported.
FRESH = {
    "interpreter": ({"TRITON_INTERPRET": "1", "GRADSCOPE_KERNEL_DEVICE": "cpu"},
                    "not compiles_for_gpus and not in_a_fresh_process"),
    "compiler": ({"TRITON_INTERPRET": None}, "compiles_for_gpus"),
}


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(FRESH))
def test_in_a_fresh_process(variant):
    """Runs this module's tests that need Triton set up otherwise than in this process: on the
    CPU in the interpreter, or (from an interpreted process) compiled. All must pass, none skip."""
    if variant == "interpreter" and DEVICE == "cpu":
        pytest.skip("this process is the interpreter's")
    if variant == "compiler" and not INTERPRETED:
        pytest.skip("compiled in this process by test_kernel_compiles_for_gpus")
    changes, select = FRESH[variant]
    env = {k: v for k, v in os.environ.items() if k not in changes}
    env.update({k: v for k, v in changes.items() if v is not None})
    done = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", select],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=900)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, done.stdout[-3000:]
