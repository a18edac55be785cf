"""Which of Inductor's loops carry gradscope's statistics: a census of its fused scheduler nodes.

Inductor fuses a graph's IR nodes into loops (its scheduler nodes after fusion; on the CPU one
C++ function may hold several). Every IR node keeps the FX nodes it came from, and those the
stack trace of the line that traced them, so a loop's nodes say whose work it does:

- ``model``: traced from anywhere but ``gradscope/recording``;
- ``fused``: a loop holding nodes of the model's and nodes of gradscope's, i.e. statistics
  Inductor put into a loop the model has anyway;
- ``own``: gradscope's nodes only (a node traced from both counts as gradscope's), by size:
  ``large`` iterates over 4096 elements or more (a pass over a feature map or a gradient),
  ``small`` fewer (per-channel finishing arithmetic and the merges into the staging);
- ``untraced``: no trace at all (functionalization's copies back into mutated inputs, such as
  BatchNorm's running statistics and gradscope's staging).

Extern kernels (convolutions, matmuls) and no-ops are not loops and are not counted. This reads
Inductor internals (torch 2.13); where they differ the census comes back empty rather than wrong.
"""

from __future__ import annotations

import collections
import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import gradscope.recording

RECORDING = str(Path(gradscope.recording.__file__).parent) + "/"
LARGE = 4096


def _whose(node: object) -> tuple[bool, bool]:
    """(gradscope's, the model's): where the FX nodes behind one scheduler node were traced."""
    ir = getattr(node, "node", None)
    origins = ir.get_origins() if hasattr(ir, "get_origins") else getattr(ir, "origins", ())
    traces = [o.meta.get("stack_trace") or "" for o in origins]
    return any(RECORDING in t for t in traces), any(t and RECORDING not in t for t in traces)


def _elements(node: object) -> int:
    """Iterations of a scheduler node's loop (its sizes times its reduction sizes)."""
    return math.prod(int(v) for ranges in node.get_ranges() for v in ranges)  # type: ignore[attr-defined]


def classify(nodes: list, tally: collections.Counter) -> None:
    """Add each loop among a scheduler's fused ``nodes`` to ``tally`` by whose work it does."""
    from torch._inductor.scheduler import NopKernelSchedulerNode

    for fused in nodes:
        if fused.is_extern() or isinstance(fused, NopKernelSchedulerNode):
            continue
        parts = [n for n in fused.get_nodes() if not isinstance(n, NopKernelSchedulerNode)]
        whose = [_whose(n) for n in parts]
        ours, theirs = any(g for g, _ in whose), any(m and not g for g, m in whose)
        if ours and theirs:
            tally["fused"] += 1
        elif ours:
            tally["own, large" if max(map(_elements, parts)) >= LARGE else "own, small"] += 1
        else:
            tally["model" if theirs else "untraced"] += 1


@contextlib.contextmanager
def census() -> Iterator[collections.Counter]:
    """Counts, by kind, the loops of every graph Inductor generates code for inside the block."""
    tally: collections.Counter = collections.Counter()
    try:
        from torch._inductor.scheduler import Scheduler
    except ImportError:
        yield tally
        return
    original = Scheduler.codegen

    def codegen(self: Scheduler, *args: object, **kwargs: object) -> None:
        try:
            classify(list(self.nodes), tally)
        except Exception:  # other internals: say nothing rather than something wrong
            tally.clear()
            tally["unavailable"] = 1
        return original(self, *args, **kwargs)

    Scheduler.codegen = codegen  # type: ignore[method-assign]
    try:
        yield tally
    finally:
        Scheduler.codegen = original  # type: ignore[method-assign]


def describe(tally: collections.Counter) -> str:
    """One line, as the benchmark prints it."""
    if "unavailable" in tally:
        return "census unavailable (Inductor internals differ)"
    if not tally:
        return "no loops generated (a cached or reused graph)"
    kinds = ("model", "fused", "own, large", "own, small", "untraced")
    return ", ".join(f"{k} {tally[k]}" for k in kinds)
