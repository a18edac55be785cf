"""Layer outputs and gradients held briefly, then reduced many at a time (GPU recording).

On a GPU a small training step is bound by the host launching kernels, and reducing each layer's
output and each gradient with its own ops costs the host a dozen launches per layer. The
``Batcher`` instead keeps a reference to each tensor and reduces the lot with one launch of
``gradscope.kernels`` per dtype: layer outputs when the model's forward ends, gradients when the
step ends, and either earlier once the tensors held pass ``HOLD_BYTES`` (so holding them never
costs more memory than that).

A held output must still hold the values its layer produced. A module that a later in-place op
overwrites (``ReLU(inplace=True)`` after a ``BatchNorm``) would be measured wrong, so a layer's
outputs are held only once its first recorded forward showed them untouched at the forward's end
(its version counter unchanged); until then, and for good where they were touched, they are
reduced at once as on the CPU. Should a held output be changed after all, that call is dropped
from the step (as if not seen) and the layer goes back to immediate reduction: a missing row,
never a wrong one.

Only tensors on the recorder's device, dense and of a float dtype the kernels read, from the
thread that made the recorder (``DataParallel`` replicas run in others) are held; anything else
takes the immediate path.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gradscope import kernels
from gradscope.stats import SATURATION_MARGIN

if TYPE_CHECKING:
    from gradscope.recorder import Recorder

#: Bytes of outputs (and, separately, of gradients) held before they are reduced early.
HOLD_BYTES = 64 << 20


def enabled(device: torch.device) -> bool:
    """Whether recorders on ``device`` batch their reductions (CUDA with Triton, or tests' MODE)."""
    return kernels.MODE is not None or kernels.triton_available(device)


class Batcher:
    """The held layer outputs and gradients of one recorder, and what it learned of its layers."""

    def __init__(self, rec: "Recorder") -> None:
        self.rec = rec
        self.device = rec.device
        self.thread = threading.get_ident()
        params = []
        for layer in rec.layers:
            bounds = layer.saturation_bounds
            middle, half = ((bounds[0] + bounds[1]) / 2, (bounds[1] - bounds[0]) / 2) if bounds else (0.0, 0.0)
            params.append([float(layer.zero_counted), float(bounds is not None), middle,
                           (1 - 2 * SATURATION_MARGIN) * half if bounds else float("inf")])
        self.host_params = params
        self.row_params = torch.tensor(params, dtype=torch.float32).reshape(-1, kernels.N_ROW_PARAMS).to(self.device)
        self.holdable: set[int] = set()  # layers whose outputs stayed untouched to the forward's end
        self.immediate: set[int] = set()  # layers whose outputs were changed in place
        self.watched: list[tuple[Tensor, int, int]] = []  # (output, version, row) being learned
        self.outputs: list[tuple[Tensor, int, int, int, int]] = []  # (output, version, slot, phase, row)
        self.output_bytes = 0
        self.grads: list[Tensor] = []
        self.grad_cells: list[int] = []
        self.grad_bytes = 0
        self.grad_stream: Any = None
        self.broken = False  # a kernel failed: the torch path from then on

    # ------------------------------------------------------------------ layer outputs

    def takes_output(self, row: int, y: Tensor) -> bool:
        return (row in self.holdable and y.device == self.device and kernels.supports(y)
                and threading.get_ident() == self.thread)

    def add_output(self, y: Tensor, slot: int, phase: int, row: int) -> None:
        self.outputs.append((y, y._version, slot, phase, row))
        self.output_bytes += y.numel() * y.element_size()
        if self.output_bytes >= HOLD_BYTES:
            self.reduce_outputs()

    def learn(self, row: int, y: Tensor) -> None:
        """Watch a layer's first output (reduced at once) to see whether it survives the forward."""
        if row in self.holdable or row in self.immediate:
            return
        if y.device != self.device or not kernels.supports(y) or threading.get_ident() != self.thread:
            return
        self.watched.append((y.detach(), y._version, row))
        if len(self.watched) > 4 * len(self.row_params) + 64:  # forwards that never end at the model
            self.end_forward()

    def end_forward(self) -> None:
        """The model's forward returned: settle what was learned and reduce the held outputs."""
        for y, version, row in self.watched:
            if row not in self.immediate:
                (self.holdable if y._version == version else self.immediate).add(row)
        self.watched.clear()
        self.reduce_outputs()

    def reduce_outputs(self) -> None:
        """Reduce every held output into the layer buffer (first calls of their step only)."""
        if not self.outputs:
            return
        entries, self.outputs, self.output_bytes = self.outputs, [], 0
        rec, counts = self.rec, self.rec._counts
        by_slot: dict[int, list[tuple[Tensor, int, int]]] = {}
        for y, version, slot, phase, row in entries:
            if y._version != version:  # changed in place after all: drop the call, stop holding
                n = y.numel()
                counts.act_n[slot, phase, row] -= n
                counts.act_calls[slot, phase, row] -= 1
                self.holdable.discard(row)
                self.immediate.add(row)
                continue
            by_slot.setdefault(slot, []).append((y, phase, row))
        per_slot = rec._layer_strides[0]
        for slot, items in by_slot.items():
            acc = torch.zeros(len(items), kernels.N_MOMENT_COLS, device=self.device)
            tensors = [y for y, _, _ in items]
            cells = [i * kernels.N_MOMENT_COLS for i in range(len(items))]
            rows = [row for _, _, row in items]
            self._run(lambda: kernels.reduce_moments(tensors, cells, rows, self.row_params, acc),
                      lambda: kernels.reduce_moments_by_torch(tensors, cells, rows, self.host_params, acc))
            values = kernels.finish_moments(acc).view(-1)
            index = rec._pattern_index("elements", tuple((rec._layer_offset(0, phase, row), 5) for _, phase, row in items))
            rec._buffer_view(False, slot * per_slot, per_slot).index_copy_(0, index, values)

    # ------------------------------------------------------------------ gradients

    def add_square(self, cell: int, grad: Tensor) -> bool:
        """Hold ``grad`` to add its squared norm to buffer element ``cell``; False if it cannot be held."""
        if grad.device != self.device or not kernels.supports(grad) or grad.requires_grad:
            return False
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        if stream != self.grad_stream:
            self.reduce_grads()
            self.grad_stream = stream
        self.grads.append(grad)
        self.grad_cells.append(cell)
        self.grad_bytes += grad.numel() * grad.element_size()
        if self.grad_bytes >= HOLD_BYTES:
            self.reduce_grads()
        return True

    def reduce_grads(self) -> None:
        """Add the held gradients' squared norms into the stats buffer, on the stream they came from."""
        if not self.grads:
            return
        grads, cells = self.grads, self.grad_cells
        self.grads, self.grad_cells, self.grad_bytes = [], [], 0
        flat = self.rec._stats_flat
        with _on_stream(self.grad_stream):
            self._run(lambda: kernels.reduce_squares(grads, cells, flat),
                      lambda: kernels.reduce_squares_by_torch(grads, cells, flat))

    def reduce_all(self) -> None:
        self.end_forward()
        self.reduce_grads()

    def _run(self, fast: Any, fallback: Any) -> None:
        """The kernel, or the torch path where there is none or it ever failed (a Triton without a
        working compiler, say)."""
        if not self.broken and kernels.uses_triton(self.device):
            try:
                fast()
                return
            except Exception as exc:  # noqa: BLE001 - never break the user's training over statistics
                self.broken = True
                warnings.warn(f"gradscope: batched statistics kernel failed ({type(exc).__name__}: {exc}); "
                              "reducing tensors one at a time from now on", RuntimeWarning, stacklevel=3)
        fallback()


def _on_stream(stream: Any) -> Any:
    """``torch.cuda.stream(stream)``, or nothing to do for None (CPU)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
