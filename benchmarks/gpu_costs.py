"""Host and device cost of each kind of work a recorded layer does, one call at a time.

On a small GPU step the host launching kernels is the bottleneck, so what a statistic costs is
mostly the host time of its call, not its bytes. This prints, for activation-sized tensors, the
host microseconds per call (a loop of calls with no sync) and the device microseconds per call
(events around the same loop) of the ops gradscope's probes use and of their alternatives.

    python benchmarks/gpu_costs.py [--device cuda] [--calls 200]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from gradscope.recording import moments as stats


def cost(fn: Callable[[], object], device: torch.device, calls: int) -> tuple[float, float]:
    """(host us, device us) per call of ``fn``, medians of 5 loops of ``calls`` calls."""
    for _ in range(10):
        fn()
    hosts, devs = [], []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host = time.perf_counter() - t0
        if device.type == "cuda":
            end.record()
            torch.cuda.synchronize(device)
            devs.append(start.elapsed_time(end) * 1e3 / calls)
        else:
            devs.append(host * 1e6 / calls)
        hosts.append(host * 1e6 / calls)
    return sorted(hosts)[2], sorted(devs)[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    device = torch.device(args.device)
    shapes = [((128, 16, 32, 32), torch.float32), ((128, 64, 8, 8), torch.float32),
              ((32, 256, 512), torch.bfloat16), ((32, 256, 2048), torch.bfloat16)]
    print(f"{'op':44} {'shape':22} {'host us':>8} {'dev us':>8}")
    for shape, dtype in shapes:
        y = torch.randn(shape, device=device).to(dtype)
        yf = y.float()
        dst = torch.zeros((), device=device)
        row = torch.zeros(8, device=device)
        ops: dict[str, Callable[[], object]] = {
            "activation_moments (mean, var, absmax)": lambda: stats.activation_moments(y, None, False),
            "  + count_nonzero": lambda: stats.activation_moments(y, None, True),
            "y.float()": lambda: y.float(),
            "var_mean(y32)": lambda: torch.var_mean(yf, correction=0),
            "vector_norm(y, inf, dtype=f32)": lambda: torch.linalg.vector_norm(y, float("inf"), dtype=torch.float32),
            "aminmax(y)": lambda: torch.aminmax(y),
            "sum(y, dtype=f32)": lambda: torch.sum(y, dtype=torch.float32),
            "vector_norm(y, 2, dtype=f32)": lambda: torch.linalg.vector_norm(y, dtype=torch.float32),
            "count_nonzero(y).float()": lambda: torch.count_nonzero(y).float(),
            "norm32(y, out=scalar)": lambda: stats.norm32(y, out=dst),
            "hypot(dst, norm32(y))": lambda: torch.hypot(dst, stats.norm32(y), out=dst),
            "stack 4 scalars + copy_ into row": lambda: row[:4].copy_(torch.stack([dst, dst, dst, dst])),
            "y.detach()": lambda: y.detach(),
        }
        for name, fn in ops.items():
            host, dev = cost(fn, device, args.calls)
            print(f"{name:44} {str(tuple(shape)):22} {host:8.1f} {dev:8.1f}", flush=True)
    # batched norms across layers: one call over 111 tensors vs 111 calls
    ys = [torch.randn(128, 16, 32, 32, device=device) for _ in range(37)] + \
         [torch.randn(128, 32, 16, 16, device=device) for _ in range(37)] + \
         [torch.randn(128, 64, 8, 8, device=device) for _ in range(37)]
    for name, fn in {
        "111 x vector_norm(y)": lambda: [torch.linalg.vector_norm(t) for t in ys],
        "_foreach_norm(111 tensors, 2)": lambda: torch._foreach_norm(ys, 2),
        "_foreach_norm(111 tensors, inf)": lambda: torch._foreach_norm(ys, float("inf")),
    }.items():
        try:
            host, dev = cost(fn, device, 20)
            print(f"{name:44} {'resnet56 acts':22} {host:8.1f} {dev:8.1f}", flush=True)
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"{name:44} failed: {exc}")
    # python-side costs
    t = torch.randn(64, device=device, requires_grad=True)
    for name, fn in {
        "register node prehook (y = t * 2)": lambda: (t * 2).grad_fn.register_prehook(lambda g: None),
        "register tensor hook (y = t * 2)": lambda: (t * 2).register_hook(lambda g: None),
        "t * 2 (no hook)": lambda: t * 2,
    }.items():
        host, dev = cost(fn, device, args.calls)
        print(f"{name:44} {'64':22} {host:8.1f} {dev:8.1f}", flush=True)
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def _noop(x_ptr, n, BLOCK: tl.constexpr):
            pid = tl.program_id(0)
            offs = pid * BLOCK + tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

        z = torch.zeros(64, device=device)
        host, dev = cost(lambda: _noop[(1,)](z, 64, BLOCK=64), device, args.calls)
        print(f"{'triton trivial kernel launch':44} {'64':22} {host:8.1f} {dev:8.1f}  (triton {triton.__version__})")
    except Exception as exc:  # noqa: BLE001
        print(f"triton: {exc}")


if __name__ == "__main__":
    main()
