"""Layer outputs and gradients held briefly, then reduced many at a time (GPU recording).

On a GPU a small training step is bound by the host launching kernels, and reducing each layer's
output and each gradient with its own ops costs the host a dozen launches per layer. The
``Batcher`` instead keeps a reference to each tensor and reduces them eight to a launch of
``recording.kernels``: layer outputs when the model's forward ends (into one accumulator, turned
into buffer columns once per forward), gradients when the step ends (added straight into the
buffer's squared-norm columns), and either earlier once the tensors held pass ``HOLD_BYTES`` (so
holding them never costs more memory than that).

A held output must still hold the values its layer produced. A module that a later in-place op
overwrites (``ReLU(inplace=True)`` after a ``BatchNorm``) would be measured wrong, so a layer's
outputs are held only once its first recorded forward showed them untouched at the forward's end
(its version counter unchanged); until then, and for good where they were touched, they are
reduced at once, one launch each. Should a held output be changed after all, that call is dropped
from the step (as if not seen) and the layer goes back to immediate reduction: a missing row,
never a wrong one. A residual branch's output F(x) (its squared norm gives ``branch_ratio``) is
held the same way: at once where the block adds to it in place (``out += x``), else with the
layer outputs.

Only tensors on the recorder's device, dense and of a float dtype the kernels read, from the
thread that made the recorder (``DataParallel`` replicas run in others) are held; anything else
takes the CPU's path of torch ops (``recording.sink``). Gradients are reduced on the stream they were made on.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

import torch
from torch import Tensor

from gradscope.recording import kernels
from gradscope.recording.buffer import StatsBuffer
from gradscope.recording.identity import sample_squares, token_direction_sums
from gradscope.recording.layers import Layer
from gradscope.recording.user_warnings import warn_user
from gradscope.store.schema import ACTIVATION, PHASES, SATURATION_MARGIN

#: Bytes of outputs (and, separately, of gradients) held before they are reduced early.
HOLD_BYTES = 64 << 20


def enabled(device: torch.device) -> bool:
    """Whether recorders on ``device`` batch their reductions: on CUDA with Triton unless the
    environment sets GRADSCOPE_BATCHING=0 (or ``kernels.MODE`` says otherwise, in tests)."""
    if kernels.MODE is not None:
        return kernels.MODE != "off"
    return os.environ.get("GRADSCOPE_BATCHING", "1") != "0" and kernels.triton_available(device)


class Batcher:
    """The held layer outputs and gradients of one recorder, and what it learned of its layers.

    It writes into the recorder's ``StatsBuffer`` (and its host counts) and nothing else.
    """

    def __init__(self, buffer: StatsBuffer, layers: list[Layer], device: torch.device) -> None:
        self.buffer = buffer
        if device.type == "cuda" and device.index is None:  # tensors name their device's index
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.device_index = device.index if device.type == "cuda" else -1  # as Tensor.get_device() says
        self.thread = threading.get_ident()
        self.stream_of = _stream_getter(self.device)
        params = []
        for layer in layers:
            bounds = layer.saturation_bounds
            middle, half = ((bounds[0] + bounds[1]) / 2, (bounds[1] - bounds[0]) / 2) if bounds else (0.0, 0.0)
            params.append([float(layer.zero_counted), float(bounds is not None), middle,
                           (1 - 2 * SATURATION_MARGIN) * half if bounds else float("inf")])
        self.host_params = params
        self.row_params = torch.tensor(params, dtype=torch.float32).reshape(-1, kernels.N_ROW_PARAMS).to(self.device)
        self.holdable: set[int] = set()  # layers whose outputs stayed untouched to the forward's end
        self.immediate: set[int] = set()  # layers whose outputs were changed in place
        self.watched: list[tuple[Tensor, int, int]] = []  # (output, version, row) being learned
        self.outputs: list[tuple[Tensor, int, int, int]] = []  # held (output, version, phase, row)
        # held residual-branch outputs F(x) (output, version, buffer cell, slot, block row); a
        # branch is learned like a layer, under the key layers + its block row
        self.branches: list[tuple[Tensor, int, int, int, int]] = []
        self.output_bytes = 0
        # Moments of the current forward's first calls, [phase * layers + row, 6], summed by the
        # kernels and turned into buffer columns once per forward (finish): acc_cells lists the
        # rows written, acc_slot the step's buffer slot.
        self.layers = len(layers)
        self.acc = torch.zeros(len(PHASES) * self.layers, kernels.N_MOMENT_COLS, device=self.device)
        self.acc_cells: list[int] = []
        self.acc_slot: int | None = None
        self.grads: list[Tensor] = []
        self.grad_cells: list[int] = []
        self.grad_bytes = 0
        self.grad_stream: Any = None
        self.zeroed_buf: Tensor | None = None  # see _zeroed
        self.zeroed_used = 0
        self.broken = False  # a kernel failed: the torch path from then on

    # ------------------------------------------------------------------ layer outputs

    def hold_output(self, y: Tensor, slot: int, phase: int, row: int) -> bool:
        """Hold ``y`` for the forward's batched reduction, if its layer's outputs survive the
        forward and the kernels can read it; False (nothing done) otherwise."""
        if row not in self.holdable or not self._readable(y):
            return False
        self._claim(slot)
        self.outputs.append((y.detach(), y._version, phase, row))
        self._count_held(y)
        return True

    def reduce_now(self, y: Tensor, slot: int, phase: int, row: int) -> bool:
        """Reduce ``y`` into the accumulator at once (one launch; its values may not last);
        False where the kernels cannot read it."""
        if not self._readable(y):
            return False
        self._claim(slot)
        cell = phase * self.layers + row
        self._run(lambda: kernels.reduce_moment(y, cell * kernels.N_MOMENT_COLS, row, self.row_params, self.acc),
                  lambda: kernels.reduce_moments_by_torch([y], [cell * kernels.N_MOMENT_COLS], [row],
                                                          self.host_params, self.acc))
        self.acc_cells.append(cell)
        return True

    def branch_square(self, row: int, cell: int, slot: int, f: Tensor) -> bool:
        """Add ||f||^2 of block ``row``'s branch output to buffer element ``cell``: held until the
        forward ends where its branch's outputs survive the forward (as layer outputs are), else at
        once; False where the kernels cannot read ``f`` (detached by the caller)."""
        if not self._readable(f):
            return False
        key = self.layers + row
        if key in self.holdable:
            self.branches.append((f, f._version, cell, slot, row))
            self._count_held(f)
            return True
        self.reduce_square_now(cell, f)
        self.learn(key, f)
        return True

    def _count_held(self, t: Tensor) -> None:
        """``t`` was just held: reduce everything held once that passes ``HOLD_BYTES``."""
        self.output_bytes += t.nbytes
        if self.output_bytes >= HOLD_BYTES:
            self.reduce_outputs()

    def learn(self, row: int, y: Tensor) -> None:
        """Watch a layer's first output (reduced at once) to see whether it survives the forward."""
        if row in self.holdable or row in self.immediate or not self._readable(y):
            return
        self.watched.append((y.detach(), y._version, row))
        if len(self.watched) > 4 * self.layers + 64:  # forwards that never end at the model
            self.end_forward()

    def end_forward(self) -> None:
        """The model's forward returned: settle what was learned and write this forward's moments."""
        for y, version, row in self.watched:
            if row not in self.immediate:
                (self.holdable if y._version == version else self.immediate).add(row)
        self.watched.clear()
        self.finish()

    def reduce_outputs(self) -> None:
        """Reduce every held output into the accumulator, up to eight per launch (and the held
        branch outputs' squares into the buffer)."""
        self.output_bytes = 0
        if self.branches:
            self._reduce_branches()
        if not self.outputs:
            return
        entries, self.outputs = self.outputs, []
        counts, slot = self.buffer.counts, self.acc_slot
        tensors, cells, rows = [], [], []
        for y, version, phase, row in entries:
            if y._version != version:  # changed in place after all: drop the call, stop holding
                counts.act_n[slot, phase, row] -= y.numel()
                counts.act_calls[slot, phase, row] -= 1
                self.holdable.discard(row)
                self.immediate.add(row)
                continue
            tensors.append(y)
            cells.append((phase * self.layers + row) * kernels.N_MOMENT_COLS)
            rows.append(row)
            self.acc_cells.append(phase * self.layers + row)
        if tensors:
            self._run(lambda: kernels.reduce_moments(tensors, cells, rows, self.row_params, self.acc),
                      lambda: kernels.reduce_moments_by_torch(tensors, cells, rows, self.host_params, self.acc))

    def _reduce_branches(self) -> None:
        entries, self.branches = self.branches, []
        counts, tensors, cells = self.buffer.counts, [], []
        for f, version, cell, slot, row in entries:
            if f._version != version:  # changed in place after all: the block's ratio is lost for
                counts.block_branch_dropped[slot, row] = True  # this step; reduce at once from now on
                self.holdable.discard(self.layers + row)
                self.immediate.add(self.layers + row)
                continue
            tensors.append(f)
            cells.append(cell)
        if tensors:
            flat = self.buffer.flat
            self._run(lambda: kernels.reduce_squares(tensors, cells, flat),
                      lambda: kernels.reduce_squares_by_torch(tensors, cells, flat))

    def finish(self) -> None:
        """Write the accumulated moments into the layer buffer and clear the accumulator."""
        self.reduce_outputs()
        if not self.acc_cells:
            self.acc_slot = None
            return
        buffer, cells = self.buffer, tuple(self.acc_cells)
        take = buffer.pattern_index("elements", tuple((cell, 1) for cell in cells))
        values = kernels.finish_moments(self.acc.index_select(0, take)).view(-1)
        per_slot = buffer.layer_strides[0]
        width = len(ACTIVATION)
        index = buffer.pattern_index("elements", tuple((buffer.layer_offset(0, *divmod(cell, self.layers)), width)
                                                       for cell in cells))
        buffer.view(False, self.acc_slot * per_slot, per_slot).index_copy_(0, index, values)
        self.acc.zero_()
        self.acc_cells, self.acc_slot = [], None

    def _claim(self, slot: int) -> None:
        """The accumulator holds one step's moments: finish another step's first."""
        if self.acc_slot != slot:
            if self.acc_slot is not None:
                self.finish()
            self.acc_slot = slot

    def _readable(self, t: Tensor) -> bool:
        return self._ours(t) and kernels.supports(t)

    def _ours(self, t: Tensor) -> bool:
        """On this recorder's device, from its thread (``DataParallel`` replicas run in others)."""
        # get_device() is an int (-1 on a CPU), cheaper to compare than a torch.device
        return t.get_device() == self.device_index and threading.get_ident() == self.thread

    # ------------------------------------------------------------------ blocks

    def sample_squares(self, x: Tensor, y: Tensor) -> Tensor | None:
        """``identity.sample_squares`` in one launch that reads x and y once; None where it cannot."""
        if not (x.is_contiguous() and y.is_contiguous() and self._readable(x) and self._readable(y)):
            return None
        samples = x.shape[0] if x.dim() else 1
        out = self._zeroed(3 * samples).view(3, samples)
        self._run(lambda: kernels.sample_squares(x, y, out),
                  lambda: out.copy_(sample_squares(x, y)))
        return out

    def block_sums(self, x: Tensor | None, y: Tensor) -> tuple[Tensor | None, Tensor] | None:
        """``identity.token_direction_sums`` of a block's output ``y`` [batch, tokens, dim] and, given
        its input ``x`` (same shape), ``identity.sample_squares``, in one launch: (squares or None
        where x is None or cannot be read, sums); None where the kernel cannot read ``y``."""
        if not (kernels.supports_tokens(y) and self._ours(y)):
            return None
        if x is not None and not (kernels.supports_tokens(x) and self._ours(x)):
            x = None
        batch, dim = y.shape[0], y.shape[2]
        sums = self._zeroed(batch * dim).view(batch, dim)
        squares = self._zeroed(3 * batch).view(3, batch) if x is not None else None

        def by_torch() -> None:
            sums.copy_(token_direction_sums(y))
            if squares is not None:
                squares.copy_(sample_squares(x, y))
        self._run(lambda: kernels.block_sums(x, y, squares, sums), by_torch)
        return squares, sums

    def _zeroed(self, n: int) -> Tensor:
        """``n`` zeroed float32 elements for a kernel to add into: the next part of a buffer that
        is zeroed once per step (``recycle``), not a fresh ``zeros`` launch per block call."""
        buf, used = self.zeroed_buf, self.zeroed_used
        if buf is None or used + n > buf.numel():  # the old buffer lives on in what was handed out
            buf = self.zeroed_buf = torch.zeros(max(n, 4096, 2 * used), device=self.device)
            used = 0
        self.zeroed_used = used + n
        return buf[used:used + n]

    def recycle(self) -> None:
        """The outputs of ``_zeroed`` were consumed (the step's block sums are written): zero them for reuse."""
        if self.zeroed_used:
            self.zeroed_buf[:self.zeroed_used].zero_()
            self.zeroed_used = 0

    # ------------------------------------------------------------------ gradients

    def add_square(self, cell: int, grad: Tensor) -> bool:
        """Hold ``grad`` to add its squared norm to buffer element ``cell``; False if it cannot be held."""
        if grad.get_device() != self.device_index or not kernels.supports(grad) or grad.requires_grad:
            return False
        stream = self.stream_of()
        if stream != self.grad_stream:
            self.reduce_grads()
            self.grad_stream = stream
        self.grads.append(grad)
        self.grad_cells.append(cell)
        self.grad_bytes += grad.nbytes
        if self.grad_bytes >= HOLD_BYTES:
            self.reduce_grads()
        return True

    def reduce_square_now(self, cell: int, t: Tensor) -> bool:
        """Add ||t||^2 to buffer element ``cell`` at once, in one launch (for a tensor that may be
        changed in place next, like a residual branch's output); False where the kernels cannot read it."""
        if not self._readable(t):
            return False
        flat = self.buffer.flat
        self._run(lambda: kernels.reduce_squares([t], [cell], flat),
                  lambda: kernels.reduce_squares_by_torch([t], [cell], flat))
        return True

    def reduce_grads(self) -> None:
        """Add the held gradients' squared norms into the stats buffer, on the stream they came from."""
        if not self.grads:
            return
        grads, cells = self.grads, self.grad_cells
        self.grads, self.grad_cells, self.grad_bytes = [], [], 0
        flat = self.buffer.flat
        with _on_stream(self.device, self.grad_stream, self.stream_of()):
            self._run(lambda: kernels.reduce_squares(grads, cells, flat),
                      lambda: kernels.reduce_squares_by_torch(grads, cells, flat))

    def reduce_all(self) -> None:
        """Everything held, written (the step ends, or the buffer is about to be copied)."""
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
                warn_user(f"gradscope: batched statistics kernel failed ({type(exc).__name__}: {exc}); "
                          "reducing tensors one at a time from now on")
        fallback()


def _stream_getter(device: torch.device) -> Any:
    """A cheap function giving the current stream's handle on ``device`` (None on a CPU)."""
    if device.type != "cuda":
        return lambda: None
    index = device.index if device.index is not None else torch.cuda.current_device()
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # about 50 times cheaper than current_stream()
    if raw is not None:
        return lambda: raw(index)
    return lambda: torch.cuda.current_stream(index).cuda_stream


def _on_stream(device: torch.device, handle: Any, current: Any) -> Any:
    """Make the stream with handle ``handle`` current (nothing to do if it is, or on a CPU)."""
    if handle is None or handle == current:
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.ExternalStream(handle, device=device))
