"""Statistics skipped inside a compiled graph on the steps the schedule does not record.

A traced probe runs every step: the schedule is data, never a guard, so by default it measures
every step and the recorder keeps the recorded ones (``traced.Staging``). With ``every > 1`` on
the CPU each traced probe is instead one opaque op with no output, keyed by integers as
``deposits`` is (the staging's key, the row): its kernel runs in Python at each call, finds the
staging, and measures and merges into it only while the staging's ``Gate`` is open, a flag the
recorder sets between steps; on a skipped step it returns at once. So nothing of the staging is an
input of such a graph: an in-graph write beside the kernels' could undo theirs (AOTAutograd
copies a mutated input back whole at the graph's end), and a probe is one node of the graph
rather than the thirty of its merge (resnet20 under ``aot_eager``: 1868 nodes traced against 209
unwatched, compiled in 15.6 s against 4.4 s, before 2026-12-02).
Not on CUDA: a CUDA graph would replay whichever branch it captured. Not ``torch.cond`` either:
Inductor compiles its branches for the layout eager gives a tensor, while with its layout
optimisation (CPU convolutions) its own buffers are channels-last, and the compiled step fails an
assertion (torch 2.13). The ops take any layout (``flexible_layout``), so no tensor is copied to
call them. Where a staging has no gate (every=1, CUDA) the formulas are traced in the graph, fused
by Inductor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradscope.recording import deposits
from gradscope.recording import traced_statistics as formulas
from gradscope.recording.identity import identity_terms, sample_squares
from gradscope.recording.moments import activation_moments, norm32


class Gate:
    """Whether the current step is recorded, for the gated ops' kernels: set by the recorder between
    steps (``traced.Staging.next_step``). Dynamo reads only the staging's key, which never changes:
    the flag would be a guard, and each step would recompile."""

    def __init__(self) -> None:
        self.open = True


def applies(staging: Any, t: Tensor) -> bool:
    """Whether ``t``'s statistics go through the ops: the staging has a gate, and ``t`` is on the CPU
    (the ops' only kernel; a model moved to a GPU after ``watch(device="cpu")`` keeps the formulas)."""
    return staging.gate is not None and t.device.type == "cpu"


def layer_output(staging: Any, phase: int, row: int, y: Tensor, count_zeros: bool,
                 bounds: tuple[float, float] | None) -> None:
    """``traced.layer_output``'s moments of ``y`` (detached), merged on recorded steps only."""
    _layer_op(staging.key, phase, row, y, count_zeros, None if bounds is None else list(bounds))


def block_output(staging: Any, row: int, x: Tensor, y: Tensor, pair: bool, tokens: bool) -> None:
    """``traced.block_output``'s call, identity sums (``pair``) and token cosines (``tokens``)."""
    _block_op(staging.key, row, x, y, pair, tokens)


def branch_output(staging: Any, row: int, f: Tensor) -> None:
    """``traced.branch_output``'s ||F(x)||^2. Also where the branch ends in a layer: reading its
    last layer's moments (``traced.branch_from_tail``) would depend on the order in which
    Inductor runs two ops that share no tensor, and ``f`` is in memory anyway, read by that
    layer's op."""
    _branch_op(staging.key, row, f)


def gradient(staging: Any, kind: int, row: int, g: Tensor) -> None:
    """A traced backward hook's ||g||^2 (``deposits``), measured on recorded steps only."""
    _gradient_op(staging.key, kind, row, g)


# ---------------------------------------------------------------------- the ops' kernels
# On a recorded step they run the eager probes' kernels (``moments``, ``identity``), chosen for
# eager execution on the CPU, over the tensors' memory in order: Inductor's conv outputs are
# channels-last, and the sums do not depend on the order.


def _layer(key: int, phase: int, row: int, y: Tensor, count_zeros: bool, bounds: list[float] | None) -> None:
    staging = deposits.open_staging(key)
    if staging is not None:
        parts = activation_moments(_flat(y), None if bounds is None else (bounds[0], bounds[1]), count_zeros)
        staging.merge_layer(phase, row, parts, y.numel())


def _block(key: int, row: int, x: Tensor, y: Tensor, pair: bool, tokens: bool) -> None:
    staging = deposits.open_staging(key)
    if staging is not None:
        staging.add_block(row, _identity_sums(x, y) if pair else None, formulas.token_cosine_sum(y) if tokens else None,
                          x.shape[0] if x.dim() else 1, y.shape[0])


def _branch(key: int, row: int, f: Tensor) -> None:
    staging = deposits.open_staging(key)
    if staging is not None:
        staging.add_branch(row, norm32(_flat(f)).square())


def _gradient(key: int, kind: int, row: int, g: Tensor) -> None:
    staging = deposits.open_staging(key)
    if staging is not None:
        deposits.add(staging, kind, row, norm32(_flat(g)).square(), g.numel())


def _identity_sums(x: Tensor, y: Tensor) -> Tensor:
    if x.dim() >= 2 and x.stride() == y.stride() and _dense(x):  # the same layout: per sample in memory order
        x, y = (t.as_strided((t.shape[0], t[0].numel()), (t.stride(0), 1)) for t in (x, y))
    return identity_terms(sample_squares(x, y)).sum(0)


def _dense(t: Tensor) -> bool:
    """Whether ``t`` fills its memory in one of the layouts whose samples are blocks of it."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)) \
        or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))


def _flat(t: Tensor) -> Tensor:
    """``t``'s elements in memory order: a view where it is ``_dense``, else a copy."""
    return t.as_strided((t.numel(),), (1,)) if t.dim() and _dense(t) else t.reshape(-1)


def _nothing(*args: Any) -> None:
    return None


_layer_op = formulas.opaque_op("gated_layer", "(int key, int phase, int row, Tensor y, bool count_zeros,"
                               " float[]? bounds) -> ()", _layer, _nothing)
_block_op = formulas.opaque_op("gated_block", "(int key, int row, Tensor x, Tensor y, bool pair, bool tokens) -> ()",
                               _block, _nothing)
_branch_op = formulas.opaque_op("gated_branch", "(int key, int row, Tensor f) -> ()", _branch, _nothing)
_gradient_op = formulas.opaque_op("gated_gradient", "(int key, int kind, int row, Tensor g) -> ()", _gradient,
                                  _nothing)

AVAILABLE = _layer_op is not None
