"""Statistics skipped inside a compiled graph on the steps the schedule does not record.

A traced probe runs every step: the schedule is data, never a guard, so by default it measures
every step and the recorder keeps the recorded ones (``traced.Staging``). With ``every > 1`` on
the CPU the statistics run instead in opaque ops that first read a ``Gate``, a flag the recorder
sets between steps: on a skipped step they return zeros for the cost of a call. Their kernels run
in Python at each call and find the gate by an int key, a constant of the graph, as ``deposits``
finds its staging (a bool tensor read there cost three ATen calls a probe). Not on CUDA: a CUDA
graph would replay whichever branch it captured. Not ``torch.cond`` either: Inductor compiles
its branches for the layout eager gives a tensor, while with its layout optimisation (CPU
convolutions) its own buffers are channels-last, and the compiled step fails an assertion (torch
2.13). The ops take any layout (``flexible_layout``), so no tensor is copied to call them.
Where a gate is None (every=1, CUDA) the formulas are traced in the graph, fused by Inductor.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import Tensor

from gradscope.recording import traced_statistics as formulas
from gradscope.recording.identity import identity_terms, sample_squares
from gradscope.recording.moments import activation_moments, norm32

AVAILABLE = formulas.OPAQUE_OPS


class Gate:
    """Whether the current step is recorded, for the gated ops' kernels: set by the recorder between
    steps (``traced.Staging.next_step``). Dynamo reads only its key, which never changes: the flag
    would be a guard, and each step would recompile."""

    def __init__(self) -> None:
        self.open = True
        self.key = next(_KEYS)  # what a traced call passes: a constant of the graph
        _GATES[self.key] = self


_GATES: weakref.WeakValueDictionary[int, Gate] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def is_open(key: int) -> bool:
    """In a kernel, at run time: whether gate ``key`` is open (a dropped recorder's is not)."""
    gate = _GATES.get(key)
    return gate is not None and gate.open


def layer_statistics(gate: Gate | None, y: Tensor, count_zeros: bool,
                     bounds: tuple[float, float] | None) -> list[Tensor]:
    """``traced_statistics.layer_statistics``, zeros on a skipped step."""
    if not _gated(gate, y):
        return formulas.layer_statistics(y, count_zeros, bounds)
    return list(_layer_op(gate.key, y, count_zeros, None if bounds is None else list(bounds)).unbind())


def identity_sums(gate: Gate | None, x: Tensor, y: Tensor) -> Tensor:
    return _identity_op(gate.key, x, y) if _gated(gate, x) else formulas.identity_sums(x, y)


def token_cosine_sum(gate: Gate | None, y: Tensor) -> Tensor:
    return _token_op(gate.key, y) if _gated(gate, y) else formulas.token_cosine_sum(y)


def branch_squares(gate: Gate | None, f: Tensor) -> Tensor:
    return _squares_op(gate.key, f) if _gated(gate, f) else formulas.branch_squares(f)


def gradient_squares(gate: Gate | None, g: Tensor, into_producer: bool = False) -> Tensor:
    return _squares_op(gate.key, g) if _gated(gate, g) else formulas.gradient_squares(g, into_producer)


def _gated(gate: Gate | None, t: Tensor) -> bool:
    """Whether ``t``'s statistic goes through an op: there is a gate, and ``t`` is on the CPU (the
    ops' only kernel; a model moved to a GPU after ``watch(device="cpu")`` keeps the fused form)."""
    return gate is not None and t.device.type == "cpu"


# ---------------------------------------------------------------------- the opaque ops
# On a recorded step they run the eager probes' kernels (``moments``, ``identity``), chosen for
# eager execution on the CPU, over the tensors' memory in order: Inductor's conv outputs are
# channels-last, and the sums do not depend on the order.


def _layer(gate: int, y: Tensor, count_zeros: bool, bounds: list[float] | None) -> Tensor:
    if not is_open(gate):
        return _layer_fake(gate, y, count_zeros, bounds)
    return torch.stack(activation_moments(_flat(y), None if bounds is None else (bounds[0], bounds[1]), count_zeros))


def _layer_fake(gate: int, y: Tensor, count_zeros: bool, bounds: list[float] | None) -> Tensor:
    return y.new_zeros(formulas.statistics_width(count_zeros, bounds), dtype=torch.float32)


def _identity(gate: int, x: Tensor, y: Tensor) -> Tensor:
    if not is_open(gate):
        return x.new_zeros(3, dtype=torch.float32)
    if x.dim() >= 2 and x.stride() == y.stride() and _dense(x):  # the same layout: per sample in memory order
        x, y = (t.as_strided((t.shape[0], t[0].numel()), (t.stride(0), 1)) for t in (x, y))
    return identity_terms(sample_squares(x, y)).sum(0)


def _token(gate: int, y: Tensor) -> Tensor:
    return formulas.token_cosine_sum(y) if is_open(gate) else y.new_zeros((), dtype=torch.float32)


def _squares(gate: int, t: Tensor) -> Tensor:
    return norm32(_flat(t)).square() if is_open(gate) else t.new_zeros((), dtype=torch.float32)


def _dense(t: Tensor) -> bool:
    """Whether ``t`` fills its memory in one of the layouts whose samples are blocks of it."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)) \
        or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))


def _flat(t: Tensor) -> Tensor:
    """``t``'s elements in memory order: a view where it is ``_dense``, else a copy."""
    return t.as_strided((t.numel(),), (1,)) if t.dim() and _dense(t) else t.reshape(-1)


_layer_op = formulas.opaque_op("gated_layer_statistics", "(int gate, Tensor y, bool count_zeros, float[]? bounds)"
                               " -> Tensor", _layer, _layer_fake)
_identity_op = formulas.opaque_op("gated_identity_sums", "(int gate, Tensor x, Tensor y) -> Tensor", _identity,
                                  lambda gate, x, y: x.new_empty(3, dtype=torch.float32))
_token_op = formulas.opaque_op("gated_token_cosine_sum", "(int gate, Tensor y) -> Tensor", _token,
                               lambda gate, y: y.new_empty((), dtype=torch.float32))
_squares_op = formulas.opaque_op("gated_squared_norm", "(int gate, Tensor t) -> Tensor", _squares,
                                 lambda gate, t: t.new_empty((), dtype=torch.float32))
