"""Compiled training steps with gradscope against the same compiled steps without it.

``overhead.py --compile [MODE]`` runs this: each variant (none, gradscope every=1, every=10)
trains its own copy of the model, watched first and then compiled with ``torch.compile(model,
mode=MODE)`` (Inductor), timed in the interleaved blocks of ``overhead.py`` and divided step by
step by the ``none`` copy's step, compiled the same way. Inside a compiled
model gradscope's probes are ops of the graph (``gradscope/recording/traced.py``) and run on every
step. With every=1 (and on CUDA) their statistics are fused into the graph; with every=10 on the
CPU they are calls to opaque ops that return at once on the steps the schedule skips
(``gradscope/recording/gated.py``), which is why the every=10 row reports recorded and other steps.

It also counts what Inductor generated for each variant's forward and backward, with its caches
off so every graph is generated: its kernel count (``torch._inductor.metrics.generated_kernel_count``;
on the CPU a loop's vectorised and scalar bodies count apart) and its loops by whose work they do
(``inductor_census.py``): the model's, the model's with statistics fused in, gradscope's own (over
large tensors or small) and untraced copies. The opaque ops of every=10 on the CPU are calls, not
loops. Memory is not measured here.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from pathlib import Path
from typing import Any

import overhead as base
import torch
from inductor_census import census, describe


def bench_compiled(name: str, spec: Any, device: torch.device, steps: int, tmp: Path,
                   mode: str) -> tuple[list[tuple], dict[str, int], dict[str, Any]]:
    """Ratio rows as ``overhead.ratio_rows`` gives them, Inductor's kernel count per variant and its
    loops by whose work they do (``inductor_census``)."""
    import torch._inductor.metrics as metrics

    torch._inductor.config.fx_graph_cache = False  # count generated kernels, not cache hits
    # Dynamo does not guard on hooks by default: the watched copies would run the code compiled
    # for the first copy, without its hooks (gradscope refuses such a step)
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    torch._functorch.config.enable_autograd_cache = False
    make, make_batch, autocast = spec
    torch.manual_seed(0)
    template = make().to(device)
    batch = make_batch(device)
    chosen: list[base.Variant] = [base.Nothing(), base.Gradscope(1), base.Gradscope(10)]
    kernels: dict[str, int] = {}
    loops: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        runners = []
        for v in chosen:
            model = copy.deepcopy(template)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            after_backward = stack.enter_context(v.attach(model, opt, tmp))  # watched before the first call
            compiled = torch.compile(model, mode=None if mode == "default" else mode)
            metrics.reset()
            with census() as loops[v.name]:
                # warm-up as overhead.py's: compiles, and puts each block's recorded step at its 6th
                base.time_steps(compiled, opt, batch, base.BLOCK + (base.BLOCK - base.RECORDED_AT), device, autocast,
                                after_backward)
            kernels[v.name] = metrics.generated_kernel_count
            runners.append((v, compiled, opt, after_backward))
        blocks, peaks = base.interleave(runners, batch, steps, device, autocast, None)
    return base.ratio_rows(name, chosen, blocks, peaks), kernels, loops


def main(args: Any, device: torch.device, workloads: dict[str, Any]) -> None:
    mode = args.compile
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"device: {device} ({where}); {base.versions()}")
    print(f"torch.compile(mode={mode!r}); timed steps per variant {args.steps}, interleaved in blocks of "
          f"{base.BLOCK}; each step over the compiled step without gradscope")
    print(f"{'workload':24} {'variant':48} {'step ms':>9} {'x time':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in base.selected(workloads, args.only).items():
            rows, kernels, loops = bench_compiled(name, spec, device, args.steps, Path(tmp), mode)
            for row in rows:
                print(f"{row[0]:24} {row[1] + row[6]:48} {row[2]:9.2f} {row[3]:7.3f}", flush=True)
            plain = kernels["none"]
            print(f"{name:24} Inductor kernels, forward and backward: none {plain}, "
                  + ", ".join(f"{v} {k} ({k - plain:+d})" for v, k in kernels.items() if v != "none"), flush=True)
            print(f"{name:24} Inductor loops (fused scheduler nodes) by whose work they do: "
                  + "; ".join(f"{v}: {describe(t)}" for v, t in loops.items()), flush=True)
