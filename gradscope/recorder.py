"""Recorder: attach to a model, follow its training steps, flush statistics to a run directory.

The recorder owns a device buffer ``[slots, phases, layers, stats]`` (one slot per recorded
step). Hooks and ``step()`` only launch device kernels that write into it; every ``flush_every``
recorded steps, and at close, the filled slots are copied to host memory without blocking and a
background thread turns them into Parquet. Between flushes nothing waits for the device.

Step boundaries: with ``optimizer=`` the optimizer's own step hooks mark them (the pre-hook sees
the final gradients, after clipping and AMP unscaling, just before the update); without it the
user calls ``step()`` after ``backward()``. Gradient accumulation therefore merges micro-batches
into one recorded step, as it should.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import itertools
import os
import platform
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gradscope.attribution import Attribution, AttributionProbe
from gradscope.batching import Batcher
from gradscope.batching import enabled as batching_enabled
from gradscope.blocks import (Block, identity_terms, sample_squares, select_blocks, token_cosines,
                              token_direction_norms, token_direction_sums)
from gradscope.layers import Layer, ModuleFilter, assign_depths, own_parameters, select_layers
from gradscope.probes import BlockProbe, BranchProbe, LayerProbe
from gradscope.stats import (
    ACCURACY,
    B_COS_SUM,
    B_DIFF_SS,
    B_TOKEN_COS_SUM,
    EVAL_ACCURACY,
    EVAL_LOSS,
    GRAD_GLOBAL_SS,
    GRAD_OUT_SS,
    GRAD_SS,
    LOSS,
    LOSS_SCALE,
    N_BLOCK_STATS,
    N_LAYER_STATS,
    N_STEP_STATS,
    PARAM_SS,
    PHASES,
    TRAIN,
    HostCounts,
    Scratch,
    accumulate_square,
    squared_norms,
)
from gradscope.store import SCHEMA_VERSION, AttributionJob, FlushJob, RunWriter

# Open recorders, held strongly so that one a user forgets to close still writes its data at exit
# (and so that a second watch() on the same modules can be refused).
_OPEN: "set[Recorder]" = set()
_MAX_CACHED_VIEWS = 50_000  # buffer views a recorder keeps (a few MB of Python objects at most)


def watch(
    model: nn.Module,
    run: str | os.PathLike[str] | None = None,
    *,
    every: int = 1,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any = None,
    modules: ModuleFilter | None = None,
    blocks: ModuleFilter | None = None,
    flush_every: int = 50,
    overwrite: bool = False,
    device: torch.device | str | None = None,
    meta: dict[str, Any] | None = None,
    attribution: Attribution | None = None,
) -> "Recorder":
    """Start recording ``model``'s gradient flow into the run directory ``run``.

    Args:
        model: any ``nn.Module``; its forward, backward and the optimizer are left untouched.
        run: directory to write (default ``runs/<ModelClass>-<timestamp>``).
        every: record steps 0, every, 2*every, ...; other steps cost one Python test per hook.
        optimizer: mark a step at each ``optimizer.step()`` and read learning rates from it.
            Without it, call ``rec.step()`` after each ``backward()``.
        scaler: a ``torch.amp.GradScaler`` in use; gradient statistics are unscaled.
        modules: which modules to watch: glob(s) on qualified names, module types, or a
            predicate ``(name, module) -> bool``. Default: every leaf module owning parameters.
        blocks: which modules to compare with the identity (same forms as ``modules``).
            Default: the blocks a reference model declares, else repeated sibling modules
            in ``nn.Sequential``/``nn.ModuleList`` containers; ``[]`` for none.
        flush_every: recorded steps written to disk at a time (the device holds one more).
        overwrite: replace an existing run at ``run`` instead of refusing.
        device: where statistics live (default: the device of the model's first parameter).
        meta: extra JSON-serialisable facts for ``meta.json`` (e.g. ``{"task": {...}}``).
        attribution: an ``Attribution`` to compute Captum attribution flow over the watched
            blocks on a probe batch at checkpoints (see ``gradscope.attribution``).

    Returns:
        The ``Recorder``; use it as a context manager or call ``close()``.
    """
    return Recorder(model, run, every=every, optimizer=optimizer, scaler=scaler, modules=modules,
                    blocks=blocks, flush_every=flush_every, overwrite=overwrite, device=device, meta=meta,
                    attribution=attribution)


class Recorder:
    """Records one model's statistics; a handle that is also a context manager."""

    def __init__(
        self,
        model: nn.Module,
        run: str | os.PathLike[str] | None = None,
        *,
        every: int = 1,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: Any = None,
        modules: ModuleFilter | None = None,
        blocks: ModuleFilter | None = None,
        flush_every: int = 50,
        overwrite: bool = False,
        device: torch.device | str | None = None,
        meta: dict[str, Any] | None = None,
        attribution: Attribution | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"gradscope.watch expects an nn.Module, got {type(model).__name__}")
        for name, value in (("every", every), ("flush_every", flush_every)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"gradscope.watch: {name} must be a positive integer, got {value!r}")
        if attribution is not None and not isinstance(attribution, Attribution):
            raise TypeError(f"gradscope.watch: attribution must be a gradscope.Attribution, got {type(attribution).__name__}")
        _refuse_if_watched(model)
        self.model, self.every, self.flush_every = model, every, flush_every
        self.optimizer, self.scaler = optimizer, scaler
        self._extra_meta = dict(meta or {})
        self.device = torch.device(device) if device is not None else _model_device(model)
        self._closed = True  # until fully set up, so a failed __init__ leaves nothing to close

        chosen = select_layers(model, modules)
        self.layers: list[Layer] = [layer for layer, _ in chosen]
        chosen_blocks = select_blocks(model, blocks)
        self.blocks: list[Block] = [block for block, _, _ in chosen_blocks]
        n, nb = len(self.layers), len(self.blocks)
        # One slot more than a flush writes: the latest step stays on the device after a flush,
        # so step(loss=) called after optimizer.step() still finds it.
        self._capacity = flush_every + 1
        # Layer and block statistics share one allocation, so a batched kernel can address any
        # element of either by its offset (block elements start at _block_base).
        layer_size, block_size = self._capacity * len(PHASES) * n * N_LAYER_STATS, self._capacity * nb * N_BLOCK_STATS
        self._stats_flat = torch.zeros(layer_size + block_size, device=self.device)
        self._block_base = layer_size
        self._layer_buf = self._stats_flat[:layer_size].view(self._capacity, len(PHASES), n, N_LAYER_STATS)
        self._block_buf = self._stats_flat[layer_size:].view(self._capacity, nb, N_BLOCK_STATS)
        self._step_buf = torch.zeros(self._capacity, N_STEP_STATS, device=self.device)
        # Strides, so a probe reaches its row with one slice of _stats_flat instead of an index
        # chain (each indexing op is a dispatcher call, and probes run hundreds per step).
        self._layer_strides = (len(PHASES) * n * N_LAYER_STATS, n * N_LAYER_STATS, N_LAYER_STATS)
        # Per-sample block norms and token cosines of this step, summed for all blocks at once at
        # the step's end (_commit_blocks): a few kernels per step instead of a dozen per block.
        # Activation moments of this step's first calls, (slot, offset within the slot, scalars),
        # likewise written for all layers at once (_commit_moments): two kernels, not one a layer.
        self._pending_moments: list[tuple[int, int, list[Tensor]]] = []
        self._pending_identity: list[tuple[int, int, Tensor]] = []
        self._pending_tokens: list[tuple[int, int, tuple[Tensor, int]]] = []  # (token sums, tokens)
        self._index_cache: dict[tuple[str, tuple[tuple[int, int], ...]], Tensor] = {}  # _pattern_index
        self._views: dict[tuple[bool, int, int], Tensor] = {}
        self._scratch = Scratch()  # CPU work vector of the probes, held during a forward only
        self._counts = HostCounts(self._capacity, n, nb)
        self._bounded = np.array([layer.saturation_bounds is not None for layer in self.layers], bool)
        self._zero_counted = np.array([layer.zero_counted for layer in self.layers], bool)
        self._calls = np.zeros(n, np.int64)
        self._execution_order: list[int] = []
        self._executed = [False] * n
        self._block_order: list[int] = []
        self._block_executed = [False] * nb
        self._block_calls = np.zeros(nb, np.int64)
        self._parameters = _ParameterIndex(model, chosen, optimizer, self.device)
        self._attribution = AttributionProbe(attribution, model, chosen_blocks, self.device) if attribution else None
        self._attribution_done: list[tuple[int, Tensor]] = []  # (step, [blocks, columns]) awaiting a flush
        self._next_attribution = 0
        # On a GPU with Triton: outputs and gradients reduced many per launch (gradscope.batching)
        self._batcher = Batcher(self) if batching_enabled(self.device) else None

        # Step state; all plain Python so hooks can test it without touching a tensor.
        self.step_index = 0
        self._recording = True
        self._grad_forward_seen = False  # a forward with autograd on ran in this step
        self._slot_steps: list[int] = []  # step number held in each used slot
        self._slots: dict[int, int] = {}  # step number -> slot
        self._late_scalars_dropped = False
        # A GradScaler that finds inf/NaN skips optimizer.step(), so the optimizer's hooks never
        # mark that step; scaler.update() replacing its per-optimizer state dict still does.
        self._watch_scaler = scaler is not None and optimizer is not None
        self._scaler_states: Any = None

        self.path = Path(run) if run is not None else _default_run_path(model)
        self._started_at = _now()
        self._writer = RunWriter(self.path, overwrite=overwrite)
        self._writer.write_meta_now(self._meta("running"))

        # Module hooks are attached only for recorded steps (with every > 1 the others run no
        # gradscope code but one pre-hook on the model); optimizer and model hooks stay.
        self._probe_hooks: list[tuple[nn.Module, str, Any]] = []
        for layer, module in chosen:
            self._probe_hooks.append((module, "forward", LayerProbe(self, layer.row, layer.saturation_bounds,
                                                                    layer.zero_counted)))
        for block, module, branch in chosen_blocks:
            block_probe = BlockProbe(self, block.row, module)
            self._probe_hooks += [(module, "pre", block_probe.before), (module, "forward", block_probe)]
            if branch is not None:
                self._probe_hooks.append((branch, "forward", BranchProbe(self, block.row)))
        # a probe pre-hook on the model itself could not be attached from the model's pre-hook
        self._always_attached = every == 1 or any(m is model and kind == "pre" for m, kind, _ in self._probe_hooks)
        self._probe_handles: list[Any] = []
        self._handles: list[Any] = []
        try:
            self._sync_probes()
            self._handles.append(model.register_forward_pre_hook(self._model_pre_hook))
            self._handles.append(model.register_forward_hook(self._model_forward_end))
            if optimizer is not None:
                self._handles.append(optimizer.register_step_pre_hook(self._before_optimizer_step))
                self._handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))
            self._attribute_if_due()  # step 0: the model as training begins
        except BaseException:
            self._remove_hooks()
            self._writer.submit_meta(self._meta("failed"))
            self._writer.close()
            raise
        self._closed = False
        _OPEN.add(self)

    # ---------------------------------------------------------------- public API

    def step(self, loss: Tensor | float | None = None, accuracy: Tensor | float | None = None) -> None:
        """Mark the end of a training step (without ``optimizer=``) and record its scalars.

        With ``optimizer=`` the optimizer marks steps and this only records ``loss`` and
        ``accuracy``, for the step whose training forward ran last, so it may be called before
        or after ``optimizer.step()``.
        """
        self._check_open()
        if self.optimizer is None:
            if self._recording:
                slot = self._open_slot()
                self._record_parameters(slot)
                self._record_scalars(slot, loss, accuracy)
            self._advance()
            self._attribute_if_due()
            return
        step = self.step_index if self._grad_forward_seen else self.step_index - 1
        if step % self.every:
            return  # not a recorded step
        slot = self._open_slot() if step == self.step_index else self._slots.get(step)
        if slot is not None:
            self._record_scalars(slot, loss, accuracy)
        elif step >= 0 and not self._late_scalars_dropped:
            self._late_scalars_dropped = True
            warnings.warn(f"gradscope: step(loss=...) for step {step} came after that step was flushed; "
                          "it was dropped (call step() before optimizer.step() to avoid this)",
                          RuntimeWarning, stacklevel=2)

    def log_eval(self, loss: Tensor | float | None = None, accuracy: Tensor | float | None = None) -> None:
        """Record held-out loss/accuracy against the most recent recorded training step."""
        self._check_open()
        slot = self._slots.get(self.step_index)
        if slot is None and self._slot_steps:
            slot = len(self._slot_steps) - 1
        if slot is None:
            slot = self._open_slot() if self._recording else None
        if slot is None:
            return
        for column, value in ((EVAL_LOSS, loss), (EVAL_ACCURACY, accuracy)):
            self._put_scalar(slot, column, value)

    def flush(self, wait: bool = False) -> None:
        """Write every completed recorded step to disk (``wait=True`` blocks until written)."""
        self._check_open()
        current = self._slots.get(self.step_index)
        completed = len(self._slot_steps) - (1 if current is not None else 0)
        self._flush(completed)
        if wait:
            self._writer.wait()

    def close(self, *, failed: bool = False) -> None:
        """Remove every hook, write what is left, and mark the run finished (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._remove_hooks()
            self._scratch.release()
        finally:
            try:
                self._flush(len(self._slot_steps))
                self._writer.submit_meta(self._meta("failed" if failed else "finished"))
            finally:
                self._writer.close()
                _OPEN.discard(self)

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(failed=exc_type is not None)

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"step {self.step_index}"
        return f"Recorder({type(self.model).__name__}, run={str(self.path)!r}, {len(self.layers)} layers, {state})"

    # ---------------------------------------------------------------- called by probes and hooks

    def _open_slot(self) -> int:
        """Buffer slot of the current step, allocated on first use (flushing a full buffer)."""
        slot = self._slots.get(self.step_index)
        if slot is None:
            if len(self._slot_steps) == self._capacity:
                self._flush(len(self._slot_steps) - 1)  # keep the latest step for a late step(loss=)
            slot = len(self._slot_steps)
            self._slot_steps.append(self.step_index)
            self._slots[self.step_index] = slot
            self._counts.clear(slot)
            if self.blocks:
                self._block_buf[slot].zero_()  # block statistics are pure sums
            if self._batcher is not None:  # batched kernels add squared norms to what is there
                self._layer_buf[slot, TRAIN, :, GRAD_OUT_SS].zero_()
        return slot

    def _buffer_view(self, blocks: bool, start: int, length: int = 0) -> Tensor:
        """A view of the statistics: ``length`` elements from offset ``start`` of the layer buffer
        (of the block buffer with ``blocks``), or the scalar there. Both buffers share one
        allocation, so layer offsets run on into the block buffer from ``_block_base``. Views are
        cached: creating one is a dispatcher call, and a dict lookup is far cheaper (the buffers
        are never reallocated, so views stay valid)."""
        key = (blocks, start, length)
        view = self._views.get(key)
        if view is None:
            at = start + self._block_base if blocks else start
            view = self._stats_flat[at: at + length] if length else self._stats_flat[at]
            if len(self._views) < _MAX_CACHED_VIEWS:
                self._views[key] = view
        return view

    def _add_square(self, offset: int, grad: Tensor, first: bool) -> None:
        """Add ||grad||^2 to element ``offset`` of the stats allocation (layer, or block from
        ``_block_base`` on): held for a batched reduction where possible, else reduced now."""
        batcher = self._batcher
        if batcher is not None:
            if batcher.add_square(offset, grad):
                return
            first = False  # the element was zeroed when the slot opened; the kernels add to it
        accumulate_square(self._buffer_view(False, offset), grad, first)

    def _block_terms(self, x: Tensor | None, y: Tensor, tokens: bool) -> tuple[Tensor | None, Tensor | None]:
        """What a block call needs of its input ``x`` (None: no identity terms) and output ``y``:
        per-sample ||y - x||^2, ||x||^2, ||y||^2 ([3, samples], ``blocks.sample_squares``) and, with
        ``tokens``, the token direction sums of y [batch, tokens, dim] (``blocks.token_direction_sums``).
        On a GPU with Triton one launch reads both tensors for both."""
        squares = sums = None
        batcher = self._batcher
        if tokens and batcher is not None:
            fused = batcher.block_sums(x, y)
            if fused is not None:
                squares, sums = fused
        if sums is None and tokens:
            sums = token_direction_sums(y)
        if squares is None and x is not None:
            if batcher is not None:
                squares = batcher.sample_squares(x, y)
            if squares is None:
                squares = sample_squares(x, y, self._scratch)
        return squares, sums

    def _layer_offset(self, slot: int, phase: int, row: int) -> int:
        a, b, c = self._layer_strides
        return slot * a + phase * b + row * c

    def _block_offset(self, slot: int, row: int) -> int:
        return (slot * len(self.blocks) + row) * N_BLOCK_STATS

    def _commit_moments(self) -> None:
        """Write the pending activation moments into the layer buffer: a stack and an index copy
        per slot (the offsets repeat from step to step, so their device index is built once),
        after the batched reduction of any held outputs."""
        if self._batcher is not None:
            self._batcher.finish()
        per_slot = self._layer_strides[0]
        for slot, items in _take_by_slot(self._pending_moments).items():
            values = torch.stack([part for _, parts in items for part in parts])
            index = self._pattern_index("elements", tuple((offset, len(parts)) for offset, parts in items))
            self._buffer_view(False, slot * per_slot, per_slot).index_copy_(0, index, values)

    def _commit_blocks(self) -> None:
        """Sum the pending per-sample identity terms and token cosines into the block buffer."""
        for slot, items in _take_by_slot(self._pending_identity).items():
            squares = torch.cat([v for _, v in items], dim=-1) if len(items) > 1 else items[0][1]
            self._add_samples(slot, slice(B_DIFF_SS, B_COS_SUM + 1), identity_terms(squares),
                              [(row, v.shape[-1]) for row, v in items])
        for slot, items in _take_by_slot(self._pending_tokens).items():
            norms = token_direction_norms([z for _, (z, _) in items])
            lengths = {t for _, (_, t) in items}
            tokens: Any = lengths.pop() if len(lengths) == 1 else torch.cat(  # sequences of several lengths
                [torch.full((z.shape[0],), float(t), dtype=norms.dtype, device=norms.device)
                 for _, (z, t) in items])
            self._add_samples(slot, B_TOKEN_COS_SUM, token_cosines(norms, tokens),
                              [(row, z.shape[0]) for row, (z, _) in items])
        if self._batcher is not None:
            self._batcher.recycle()

    def _add_samples(self, slot: int, columns: Any, terms: Tensor, rows: list[tuple[int, int]]) -> None:
        """Add per-sample ``terms`` into the block buffer, each sample to its (row, samples) entry's row."""
        index = self._pattern_index("samples", tuple(rows))
        self._block_buf[slot][:, columns].index_add_(0, index, terms)

    def _pattern_index(self, kind: str, pattern: tuple[tuple[int, int], ...]) -> Tensor:
        """Device index for a pattern of pending entries, which repeats from step to step, so it
        is built and copied to the device once. ``"elements"``: the buffer elements of (offset,
        length) runs; ``"samples"``: the block row of every sample of (row, samples) entries."""
        key = (kind, pattern)
        index = self._index_cache.get(key)
        if index is None:
            if len(self._index_cache) > 128:
                self._index_cache.clear()
            if kind == "elements":
                values = np.concatenate([np.arange(offset, offset + length) for offset, length in pattern])
            else:
                values = np.repeat([row for row, _ in pattern], [n for _, n in pattern])
            index = self._index_cache[key] = _device_index(values, self.device)
        return index

    def _check_scaler_update(self) -> None:
        """End a step that the GradScaler skipped (called from the model's pre-hook, pure Python)."""
        states = self.scaler._per_optimizer_states
        if states is not self._scaler_states:
            if self._scaler_states is not None:  # update() ran with no optimizer step since
                self._advance(sync=False)
            self._scaler_states = states

    def _capture_loss_scale(self, slot: int) -> None:
        """Copy the scaler's current scale tensor into the slot, once per step (no sync)."""
        scaler = self.scaler
        if scaler is None or self._counts.step_set[slot, LOSS_SCALE] or not scaler.is_enabled():
            return
        scale = getattr(scaler, "_scale", None)
        if scale is not None:
            self._step_buf[slot, LOSS_SCALE].copy_(scale.reshape(()))
            self._counts.step_set[slot, LOSS_SCALE] = True

    def _note_execution(self, row: int) -> None:
        if not self._executed[row]:
            self._executed[row] = True
            self._execution_order.append(row)

    def _note_block_execution(self, row: int) -> None:
        if not self._block_executed[row]:
            self._block_executed[row] = True
            self._block_order.append(row)

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._recording:
            self._record_parameters(self._open_slot())

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._advance()
        self._attribute_if_due()

    def _attribute_if_due(self) -> None:
        """Run the attribution checkpoint for the step about to begin, if one is due.

        Called only between steps (never from a forward hook), with gradscope's own probes
        paused so the probe batch leaves no trace in the step statistics.
        """
        probe = self._attribution
        if probe is None or self.step_index < self._next_attribution:
            return
        with self._paused():
            values = probe()
        self._attribution_done.append((self.step_index, values))
        every = probe.config.every
        self._next_attribution = (self.step_index // every + 1) * every

    @contextlib.contextmanager
    def _paused(self) -> Any:
        saved = (self._recording, self._grad_forward_seen, self._watch_scaler, self._scaler_states)
        self._recording = self._watch_scaler = False
        try:
            yield
        finally:
            self._recording, self._grad_forward_seen, self._watch_scaler, self._scaler_states = saved

    # ---------------------------------------------------------------- internals

    def _advance(self, sync: bool = True) -> None:
        self.step_index += 1
        self._recording = self.step_index % self.every == 0
        self._grad_forward_seen = False
        self._scaler_states = None
        if sync:  # not from inside a forward, where hook dicts are being iterated
            self._sync_probes()

    def _record_parameters(self, slot: int) -> None:
        """Own-parameter and gradient norms of every row, and the global gradient norm
        (at the step's end, where the pending block sums are committed too)."""
        if self._batcher is not None:
            self._batcher.reduce_all()
        self._commit_moments()
        self._commit_blocks()
        self._scratch.release()  # in case the forward ended somewhere the model's hook did not see
        p = self._parameters
        with torch.no_grad():
            grad_ss, rows_with_grad = p.write_norms(param_col=self._layer_buf[slot, TRAIN, :, PARAM_SS],
                                                    grad_col=self._layer_buf[slot, TRAIN, :, GRAD_SS])
            self._step_buf[slot, GRAD_GLOBAL_SS].copy_(grad_ss)
        counts = self._counts
        counts.param_rows[slot] = p.rows_with_params
        counts.grad_rows[slot] = rows_with_grad
        counts.step_set[slot, GRAD_GLOBAL_SS] = True
        counts.lr[slot], counts.step_lr[slot] = p.learning_rates()
        self._capture_loss_scale(slot)
        if counts.step_set[slot, LOSS_SCALE]:
            counts.grads_scaled[slot] = not _scaler_unscaled(self.scaler, self.optimizer)

    def _record_scalars(self, slot: int, loss: Any, accuracy: Any) -> None:
        for column, value in ((LOSS, loss), (ACCURACY, accuracy)):
            self._put_scalar(slot, column, value)

    def _put_scalar(self, slot: int, column: int, value: Any) -> None:
        """Write a Python number or a one-element tensor into the step buffer (no sync)."""
        if value is None:
            return
        dst = self._step_buf[slot, column]
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"gradscope: expected a scalar, got a tensor of shape {tuple(value.shape)}")
            dst.copy_(value.detach().reshape(()))
        else:
            dst.fill_(float(value))
        self._counts.step_set[slot, column] = True

    def _flush(self, upto: int) -> None:
        """Hand slots [0, upto) and finished attribution checkpoints to the writer; keep the rest."""
        if self._attribution_done:
            done, self._attribution_done = self._attribution_done, []
            values = [_to_host(v) for _, v in done]
            self._writer.submit(AttributionJob(steps=[s for s, _ in done], values=values,
                                               block_names=self._attribution.names,  # type: ignore[union-attr]
                                               method=self._attribution.config.method,  # type: ignore[union-attr]
                                               ready=_copies_done(self.device)))
        if upto <= 0:
            return
        if self._batcher is not None:
            self._batcher.reduce_all()
        self._commit_moments()
        self._commit_blocks()
        counts = self._counts.take(upto)
        self._calls = np.maximum(self._calls, counts.act_calls.max(axis=(0, 1)))
        if self.blocks:
            self._block_calls = np.maximum(self._block_calls, counts.block_calls.max(axis=0))
        buffers = (self._layer_buf, self._step_buf, self._block_buf)
        layer_host, step_host, block_host = (_to_host(b[:upto]) for b in buffers)
        ready = _copies_done(self.device)
        self._writer.submit(FlushJob(
            steps=self._slot_steps[:upto], layer_buf=layer_host, step_buf=step_host, block_buf=block_host,
            counts=counts, layer_names=[layer.name for layer in self.layers],
            block_names=[block.name for block in self.blocks], bounded=self._bounded,
            zero_counted=self._zero_counted, ready=ready))
        rest = self._slot_steps[upto:]
        for i in range(len(rest)):  # move the unfinished step down to slot i
            for b in buffers:
                b[i].copy_(b[upto + i])
            self._counts.move(upto + i, i)
        self._slot_steps = rest
        self._slots = {step: i for i, step in enumerate(rest)}
        self._writer.submit_meta(self._meta("running"))

    def _meta(self, status: str) -> dict[str, Any]:
        assign_depths(self.layers, self._execution_order)
        assign_depths(self.blocks, self._block_order)
        for layer in self.layers:
            layer.calls = int(self._calls[layer.row])
        for block in self.blocks:
            block.calls = int(self._block_calls[block.row])
        return {
            "schema_version": SCHEMA_VERSION,
            "gradscope_version": _version(),
            "run": self.path.name,
            "status": status,
            "started_at": self._started_at,
            "updated_at": _now(),
            "model": {"class": type(self.model).__name__,
                      "depth": getattr(self.model, "depth", None) if isinstance(getattr(self.model, "depth", None), int) else None,
                      "registry_name": getattr(self.model, "gradscope_name", None),
                      "config": getattr(self.model, "gradscope_config", None),
                      "parameters": sum(p.numel() for p in self.model.parameters())},
            "layers": [layer.to_json() for layer in self.layers],
            "blocks": [block.to_json() for block in self.blocks],
            "attribution": self._attribution.config.describe() if self._attribution else None,
            "task": None,
            "optimizer": _describe_optimizer(self.optimizer),
            "schedule": {"every": self.every, "flush_every": self.flush_every,
                         "last_step": self.step_index},
            "env": {"torch": torch.__version__, "python": platform.python_version(),
                    "device": str(self.device), "world_size": 1,
                    "amp_scaler": self.scaler is not None},
            **self._extra_meta,
        }

    def _remove_hooks(self) -> None:
        handles, self._handles, self._probe_handles = self._handles + self._probe_handles, [], []
        for handle in handles:
            handle.remove()

    def _sync_probes(self) -> None:
        """Attach the module probes for a recorded step, detach them for the others."""
        want = self._recording or self._always_attached
        if want and not self._probe_handles:
            for module, kind, probe in self._probe_hooks:
                register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
                self._probe_handles.append(register(probe))
        elif not want and self._probe_handles:
            handles, self._probe_handles = self._probe_handles, []
            for handle in handles:
                handle.remove()

    def _model_pre_hook(self, module: nn.Module, args: Any) -> None:
        """Before each forward of the whole model: step bookkeeping that must not wait for a probe."""
        if self._watch_scaler:
            self._check_scaler_update()
        if torch.is_grad_enabled():
            self._grad_forward_seen = True
        self._sync_probes()  # a step the GradScaler skipped may have begun a recorded one

    def _model_forward_end(self, module: nn.Module, args: Any, output: Any) -> None:
        """After each forward of the whole model: the probes' work vector is not needed until the
        next, and the outputs held for a batched reduction are reduced."""
        self._scratch.release()
        if self._batcher is not None:
            self._batcher.end_forward()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("gradscope: this Recorder is closed")


class _ParameterIndex:
    """Maps the model's parameters to buffer rows so all norms come from batched kernels.

    ``torch._foreach_norm`` computes every norm in one call (per device and dtype); an
    ``index_add_`` then sums squared norms into rows. Index tensors are built once per pattern
    of which parameters have gradients, and copied to the device without a blocking transfer.
    """

    def __init__(self, model: nn.Module, chosen: list[tuple[Layer, nn.Module]],
                 optimizer: torch.optim.Optimizer | None, device: torch.device) -> None:
        self.device = device
        self.params: list[nn.Parameter] = list(model.parameters())  # unique, shared ones once
        position = {id(p): i for i, p in enumerate(self.params)}
        pairs = [(position[id(p)], layer.row) for layer, m in chosen for p in own_parameters(m)
                 if id(p) in position]
        self.owned = [i for i, _ in pairs]  # parameter index of each (parameter, row) pair
        self.rows = _device_index([r for _, r in pairs], device)
        self.rows_with_params = np.zeros(len(chosen), bool)
        self.rows_with_params[[r for _, r in pairs]] = True
        self._pair_rows = np.array([r for _, r in pairs], np.int64)
        self._cache: dict[tuple[bool, ...], tuple[Tensor, Tensor, np.ndarray]] = {}

        # learning rate per row: the param group of the row's first own parameter
        self.optimizer = optimizer
        self.row_group = np.full(len(chosen), -1, np.int64)
        if optimizer is not None:
            group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
            for layer, m in chosen:
                for p in own_parameters(m):
                    if id(p) in group_of:
                        self.row_group[layer.row] = group_of[id(p)]
                        break

    def write_norms(self, param_col: Tensor, grad_col: Tensor) -> tuple[Tensor, np.ndarray]:
        """Write per-row squared norms into the two buffer columns.

        Returns the global squared gradient norm (a device scalar) and which rows had gradients.
        """
        owned = [self.params[i] for i in self.owned]
        param_col.zero_().index_add_(0, self.rows, squared_norms(owned, self.device))
        # Sparse gradients (nn.Embedding(sparse=True)) have no batched norm: left out, NaN.
        has_grad = tuple(p.grad is not None and not p.grad.is_sparse for p in self.params)
        if has_grad not in self._cache:
            self._cache[has_grad] = self._grad_index(has_grad)
        take, rows, rows_with_grad = self._cache[has_grad]
        grads = [p.grad for p, has in zip(self.params, has_grad) if has]
        grad_sq = squared_norms(grads, self.device)
        grad_col.zero_().index_add_(0, rows, grad_sq.index_select(0, take))
        return grad_sq.sum(), rows_with_grad

    def _grad_index(self, has_grad: tuple[bool, ...]) -> tuple[Tensor, Tensor, np.ndarray]:
        where = np.cumsum(has_grad) - 1  # position of each parameter's grad in the grad list
        keep = [k for k, i in enumerate(self.owned) if has_grad[i]]
        take = _device_index([int(where[self.owned[k]]) for k in keep], self.device)
        rows = _device_index([int(self._pair_rows[k]) for k in keep], self.device)
        rows_with_grad = np.zeros_like(self.rows_with_params)
        rows_with_grad[self._pair_rows[keep]] = True
        return take, rows, rows_with_grad

    def learning_rates(self) -> tuple[np.ndarray, float]:
        """Per-row learning rate and the first group's, as host floats (NaN where unknown)."""
        if self.optimizer is None:
            return np.full(len(self.row_group), np.nan), float("nan")
        lrs = np.array([_host_float(g.get("lr")) for g in self.optimizer.param_groups] + [np.nan])
        return lrs[self.row_group], float(lrs[0])


# -------------------------------------------------------------------- helpers


def _take_by_slot(pending: list[tuple[Any, ...]]) -> dict[int, list[tuple[Any, Any]]]:
    """Empty a pending list of (slot, key, value) into {slot: [(key, value), ...]}, in order."""
    by_slot: dict[int, list[tuple[Any, Any]]] = {}
    for slot, key, value in pending:
        by_slot.setdefault(slot, []).append((key, value))
    pending.clear()
    return by_slot


def _device_index(values: Any, device: torch.device) -> Tensor:
    """An int64 index tensor on ``device``, copied without a blocking host transfer."""
    t = torch.as_tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _to_host(t: Tensor) -> Tensor:
    """A host copy of ``t``; from CUDA it is pinned and may still be in flight."""
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t.detach(), non_blocking=True)
    return t.detach().to("cpu", copy=True)


def _copies_done(device: torch.device) -> Any:
    """A CUDA event after the copies just queued on ``device`` (None where copies are synchronous)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def _host_float(value: Any) -> float:
    """A learning rate as a float without waiting on a device (CUDA tensors give NaN)."""
    if isinstance(value, Tensor):
        return float(value) if value.device.type == "cpu" else float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _scaler_unscaled(scaler: Any, optimizer: Any) -> bool:
    """Whether the scaler has already unscaled the gradients in this step.

    With an optimizer, its own state says; without one, any optimizer unscaled by the scaler
    (``scaler.unscale_(opt)`` before clipping, say) counts.
    """
    states = getattr(scaler, "_per_optimizer_states", {})
    chosen = [states.get(id(optimizer), {})] if optimizer is not None else list(states.values())
    return any(getattr(s.get("stage"), "name", None) in ("UNSCALED", "STEPPED") for s in chosen)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _refuse_if_watched(model: nn.Module) -> None:
    mine = {id(m) for m in model.modules()}
    for rec in list(_OPEN):
        if not rec._closed and mine & {id(m) for m in rec.model.modules()}:
            raise RuntimeError(
                f"gradscope.watch: {type(model).__name__} (or a module inside it) is already watched "
                f"by {rec!r}; close that recorder first")


def _default_run_path(model: nn.Module) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{type(model).__name__.lower()}-{stamp}"


def _describe_optimizer(optimizer: Any) -> dict[str, Any] | None:
    if optimizer is None:
        return None
    defaults = {k: v for k, v in optimizer.defaults.items() if _json_safe(v)}
    return {"class": type(optimizer).__name__, "defaults": defaults,
            "param_groups": len(optimizer.param_groups)}


def _json_safe(value: Any) -> bool:
    if isinstance(value, (bool, int, str)) or value is None:
        return True
    if isinstance(value, float):
        return np.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_json_safe(v) for v in value)
    return False


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _version() -> str:
    from gradscope import __version__

    return __version__


@atexit.register
def _close_open_recorders() -> None:
    """Write what open recorders still hold when the interpreter exits (no lost data)."""
    for rec in list(_OPEN):
        try:
            rec.close()
        except Exception:  # exiting anyway; nothing better to do with the error
            pass
