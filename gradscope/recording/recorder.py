"""Recorder: attach to a model, follow its training steps, flush statistics to a run directory.

The recorder wires the parts of the recording core (docs/design.md, "Recording core"): the
``StepClock`` says which step is running and whether it is recorded; the ``ProbeHooks`` measure
outputs and gradients and write through the ``Sink`` into the ``StatsBuffer`` (with the
``Batcher`` on a GPU); ``ParameterNorms`` adds the parameters at each step's end. Every
``flush_every`` recorded steps, and at close, the filled slots are copied to host memory
without blocking and the store's writer thread turns them into Parquet. Between flushes
nothing waits for the device.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gradscope.recording import termination
from gradscope.recording.amp import LossScale, ScalerUpdateHook
from gradscope.recording.arguments import check_args, checked_device, checked_meta, default_run_path, refuse_if_watched
from gradscope.recording.attribution import Attribution, AttributionProbe
from gradscope.recording.batching import Batcher
from gradscope.recording.batching import enabled as batching_enabled
from gradscope.recording.blocks import Block, select_blocks
from gradscope.recording.buffer import StatsBuffer, copies_done, to_host
from gradscope.recording.clock import StepClock
from gradscope.recording.compilation import HookCheck, WrapperForwards, compiled
from gradscope.recording.exchange import Exchange
from gradscope.recording.hooks import ModelEnd, ModelStart, ProbeHooks
from gradscope.recording.layers import ExecutionOrder, Layer, ModuleFilter, Ownership, ParameterRow, select_layers
from gradscope.recording.microbatches import MicroBatchNorms
from gradscope.recording.nonfinite import NonFiniteCheck
from gradscope.recording.optimizers import has_closure, unwrap_optimizer
from gradscope.recording.parameters import ParameterNorms
from gradscope.recording.processes import Holding, detect, fsdp1_segments, unwrap
from gradscope.recording.run_meta import run_meta
from gradscope.recording.sink import Sink
from gradscope.recording.traced import Staging
from gradscope.recording.user_warnings import warn_user
from gradscope.store.appending import analysis_table
from gradscope.store.meta import now
from gradscope.store.parts import AttributionJob, FlushJob, TableJob
from gradscope.store.schema import EVAL_ACCURACY, EVAL_LOSS, GRAD_GLOBAL_SS, GRAD_POST_CLIP_SS, GRAD_PRE_CLIP_SS
from gradscope.store.writer import NoWriter, RunWriter

_OPEN = termination.OPEN
# Host bookkeeping a compiled opt.step or training step must run, not trace (the model's hooks are traced)
_eager = torch.compiler.disable


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
        per_rank: bool = False,
        on_nonfinite: str = "warn",
        noise_scale: bool = False,
    ) -> None:
        check_args(model, run, every, flush_every, attribution, on_nonfinite)
        wrapped, model = model, unwrap(model)  # DDP's forward calls the user's model unchanged
        refuse_if_watched(model, _OPEN)
        self.model, self.every, self.flush_every = model, every, flush_every
        optimizer, self._optimizer_wrappers = unwrap_optimizer(optimizer)  # accelerate's, Lightning's
        self.optimizer, self.scaler = optimizer, scaler
        self._gradients_read: bool | None = None  # read_gradients(clipped=) in this step
        self._closure = False  # the optimizer step in progress was given a closure
        self._gradient_stage = "optimizer.step()" if optimizer is not None else "step()"  # for meta.json
        self._extra_meta = checked_meta(meta)
        self.device = checked_device(device, model)
        self._closed = True  # until fully set up, so a failed __init__ leaves nothing to close
        self._wrapped = wrapped
        self.processes = detect(wrapped, model)
        self.per_rank = bool(per_rank) and self.processes.several
        several = self.processes.several
        self._exchange = Exchange(self.processes) if several else None
        self._failure: str | None = None  # why this rank closed early, for rank 0's meta.json

        try:  # with several processes a rank's error here must reach the others, or they wait for it
            # also in a job of one process: its parameters may be DTensors, or FSDP1 flat ones
            self._ownership = ownership = Ownership(*fsdp1_segments(model))
            chosen = select_layers(model, modules, ownership)
            self.layers: list[Layer] = [layer for layer, _ in chosen]
            chosen_blocks = select_blocks(model, blocks)
            self.blocks: list[Block] = [block for block, _, _ in chosen_blocks]
            self._layer_order, self._block_order = ExecutionOrder(len(self.layers)), ExecutionOrder(len(self.blocks))
            self._nonfinite = NonFiniteCheck(on_nonfinite, self.layers, self._layer_order, backward=scaler is None)
            self._calls = np.zeros(len(self.layers), np.int64)  # most calls in one recorded step
            self._block_calls = np.zeros(len(self.blocks), np.int64)
            probed = np.array([not isinstance(m, ParameterRow) for _, m in chosen], bool)  # module hooks
            self._hook_check = HookCheck(probed, [m for _, m in chosen], [layer.name for layer in self.layers])
            self._bounded = np.array([layer.saturation_bounds is not None for layer in self.layers], bool)
            self._zero_counted = np.array([layer.zero_counted for layer in self.layers], bool)

            # One slot more than a flush writes: the latest step stays on the device after a flush,
            # so step(loss=) called after optimizer.step() still finds it.
            self._clock = StepClock(every, scaler, optimizer)
            self._buffer = StatsBuffer(flush_every + 1, len(self.layers), len(self.blocks), self.device)
            # On a GPU with Triton: outputs and gradients reduced many per launch (recording.batching)
            self._batcher = Batcher(self._buffer, self.layers, self.device) if batching_enabled(self.device) else None
            self._loss_scale = LossScale(scaler, optimizer, self._buffer.step, self._buffer.counts)
            self._sink = Sink(self._clock, self._buffer, self._batcher, self._loss_scale, on_full=self._buffer_full)
            self._micro = MicroBatchNorms(model, wrapped, self._clock, self._buffer, self._sink.slot, self.device,
                                          several) if noise_scale else None
            self._staging = Staging(len(self.layers), len(self.blocks), self.device, every)  # probes traced by Dynamo
            self._parameters = ParameterNorms(model, chosen, optimizer, self.device,
                                              Holding(model, self.processes), ownership)
            self._parameters_checked = False
            self._attribution = AttributionProbe(attribution, model, chosen_blocks, self.device) \
                if attribution else None
            self._attribution_done: list[tuple[int, Tensor]] = []  # (step, [blocks, columns]) awaiting a flush
            self._next_attribution = 0
            self._late_scalars_dropped = False
            self._pid = os.getpid()
            self._last_type_at_start = getattr(sys, "last_type", None)  # a REPL keeps its last traceback's
            self._forwards_open = 0  # model forwards begun and not returned (an exception can leave one open)
            self._dropped_step: int | None = None  # the step in progress when an exception or a signal closed us
            self._compiled = compiled(wrapped)  # (or later: a probe traced by Dynamo says so)
            self._refusal: str | None = None  # why the recorder closed itself, for meta.json's errors
        except Exception as exc:
            if self._exchange is None:
                raise
            self._exchange.start({}, exc, lambda problem: None)  # raises on every rank
            raise

        self.path = Path(run) if run is not None else default_run_path(model)
        self._started_at = now()
        self._writer = self._open_run(overwrite)

        self._probes = ProbeHooks(model, self._clock, self._sink, chosen, self._layer_order, chosen_blocks,
                                  self._block_order, self._staging)
        self._handles: list[Any] = []  # the model's and the optimizer's hooks, attached throughout
        try:
            self._probes.pin() if self._compiled else self._probes.sync(self._clock.recording)
            if self._micro is not None:
                self._micro.attach()
            self._handles.append(model.register_forward_pre_hook(ModelStart(self._model_pre_hook)))
            self._handles.append(model.register_forward_hook(ModelEnd(self._model_forward_end)))
            self._handles += WrapperForwards(wrapped, self._clock).handles  # whether its forwards ran hooked code
            if optimizer is not None:
                self._handles.append(optimizer.register_step_pre_hook(_eager(self._before_optimizer_step)))
                self._handles.append(optimizer.register_step_post_hook(_eager(self._after_optimizer_step)))
                if scaler is not None:
                    self._handles.append(ScalerUpdateHook(scaler, self._before_scaler_update))
            self._attribute_if_due()  # step 0: the model as training begins
        except BaseException:
            self._remove_hooks()
            self._writer.finish(lambda errors: self._meta("failed", errors))
            self._writer.close()
            raise
        self._closed = False
        _OPEN.add(self)
        termination.install()

    # ---------------------------------------------------------------- public API

    @property
    def step_index(self) -> int:
        """The step training is in (0 for the first)."""
        return self._clock.step

    @_eager
    def step(self, loss: Tensor | float | None = None, accuracy: Tensor | float | None = None, *,
             grad_norm_pre_clip: Tensor | float | None = None) -> None:
        """Mark the end of a training step (without ``optimizer=``) and record its scalars.

        With ``optimizer=`` the optimizer marks steps and this only records ``loss`` and
        ``accuracy``, for the step whose training forward ran last, so it may be called before
        or after ``optimizer.step()``. ``grad_norm_pre_clip``: the global norm a clip returned
        (``clip_grad_norm_``'s result), kept as ``grad_norm_pre_clip`` (once: it is global already).
        """
        self._check_open()
        clock = self._clock
        scalars = (loss, accuracy, grad_norm_pre_clip)
        if self.optimizer is None:
            if clock.recording:
                slot = self._sink.slot()
                self._end_step(slot)
                self._sink.step_scalars(slot, *scalars, counted_here=self.processes.writes)
            self._advance()
            self._attribute_if_due()
            return
        step = clock.scalar_step()
        if step % self.every:
            return  # not a recorded step
        slot = self._sink.slot() if step == clock.step else self._buffer.slots.get(step)
        if slot is not None:
            self._sink.step_scalars(slot, *scalars, counted_here=self.processes.writes)
        elif step >= 0 and not self._late_scalars_dropped:
            self._late_scalars_dropped = True
            warn_user(f"gradscope: step(loss=...) for step {step} came after that step was flushed; "
                      "it was dropped (call step() before optimizer.step() to avoid this)")

    @_eager
    def read_gradients(self, *, clipped: bool) -> None:
        """Take this step's gradient statistics now, before ``optimizer.step()``: for a framework
        callback that runs between the backward and the update (``gradscope.integrations``).

        ``clipped`` says whether the framework has clipped them yet (meta.json's ``gradients``).
        After ``clipped=False`` the global norm is read again at ``optimizer.step()``, so the run
        holds it on both sides of the clip. Needs ``optimizer=``: its step still ends the step, or,
        where an AMP scaler skips it, the scaler's ``update()`` does (without ``scaler=``, the next
        training forward).
        """
        self._check_open()
        if self.optimizer is None:
            raise RuntimeError("gradscope: read_gradients() needs watch(optimizer=...); without it, step() "
                               "reads the gradients and ends the step")
        if self._gradients_read is not None:
            return  # once per step
        self._gradients_read = bool(clipped)
        self._gradient_stage = "post-clip" if clipped else "pre-clip"
        if self._clock.recording:
            slot = self._sink.slot()
            self._end_step(slot)
            self._sink.scalar(slot, GRAD_POST_CLIP_SS if clipped else GRAD_PRE_CLIP_SS,
                              self._buffer.step[slot, GRAD_GLOBAL_SS])

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing is recorded inside: for an analysis or attribution run on the model (the probes
        a compiled model traces measure every forward: their staging is put back as it was)."""
        staged = self._staging.saved() if self._staging.used else None
        try:
            with self._clock.paused():
                yield
        finally:
            if staged is not None:
                self._staging.restore(staged)
            elif self._staging.used:  # first traced inside: what it measured is the analysis's
                self._staging.zero()

    def write_table(self, table: str, frame: Any) -> None:
        """Store an analysis's rows (``gradscope.analyses``) in this run, in order with its flushes."""
        self._check_open()
        self._writer.submit(TableJob(table, analysis_table(table, frame)))
        self._writer.submit_meta(self._meta("running"))

    @_eager
    def log_eval(self, loss: Tensor | float | None = None, accuracy: Tensor | float | None = None) -> None:
        """Record held-out loss/accuracy at the step training is in: between two steps, the one
        about to begin (the model as the last step left it), like the eval forward's own rows.

        Every evaluation gets its own step, also on steps the schedule does not record (their
        rows hold only the evaluation), so evaluating more often than ``every`` loses none.
        """
        self._check_open()
        if loss is None and accuracy is None:
            return
        slot = self._sink.slot()
        for column, value in ((EVAL_LOSS, loss), (EVAL_ACCURACY, accuracy)):
            self._sink.scalar(slot, column, value)

    @_eager
    def flush(self, wait: bool = False) -> None:
        """Write every completed recorded step to disk (``wait=True`` blocks until written)."""
        self._check_open()
        buffer = self._buffer
        current = buffer.slots.get(self._clock.step)
        self._flush(len(buffer.slot_steps) - (1 if current is not None else 0), limit=self._clock.step)
        if wait:
            self._writer.wait()

    @_eager
    def close(self, *, failed: bool = False) -> None:
        """Remove every hook, write what is left, and mark the run finished (idempotent).

        ``failed=True`` marks it failed and leaves out the step in progress, if any.
        """
        self._close("failed" if failed else "finished")

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self._failure = f"{exc_type.__name__}: {exc}"
        try:
            self._close(termination.status_after(exc_type, exc))
        except Exception as error:
            if exc_type is None:
                raise
            # the training's own exception matters more; what went wrong closing is in meta.json too
            warnings.warn(f"gradscope: closing {self.path} after {exc_type.__name__}: {error}", RuntimeWarning,
                          stacklevel=2)

    def _close(self, status: str) -> None:
        """Close with ``status``: finished, failed (an exception) or interrupted (Ctrl-C, SIGTERM).

        After a failure or an interruption the step in progress (a forward not returned, or a
        training step not ended) is left out: its statistics cover part of the model. The run
        is ``finished`` only if every recorded step reached disk; otherwise ``failed``, with the
        write errors in meta.json.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._remove_hooks()
            self._sink.scratch.release()
        finally:
            try:
                staging = self._staging
                if status == "finished" and self._clock.recording and staging.used and staging.holds_any():
                    staging.fold(self._buffer, self._sink.slot())  # what ran since the last step's end
                slots = len(self._buffer.slot_steps)
                if status != "finished" and self._step_in_progress():
                    self._dropped_step = self._clock.step
                    slots -= 1
                lost: list[str] = [self._refusal] if self._refusal else []
                if self._exchange is not None and (status != "finished" or not self._exchange.connected()):
                    status, slots = self._exchange.close_alone(status, self._buffer.slot_steps[:slots], self._failure,
                                                               lost)
                try:
                    self._flush(slots, commit=status == "finished", limit=self._clock.step + 1)
                except Exception as exc:  # e.g. a CUDA error that broke the device: the steps held there are
                    lost.append(f"steps not written ({type(exc).__name__}: {exc})")  # lost; say so
                    if self._exchange is not None and self.processes.writes:  # a peer gone: which, and why
                        lost.extend(self._exchange.failures())
                    if status == "finished":
                        raise
                    warn_user(f"gradscope: closing {self.path}: {lost[0]}")
                finally:
                    self._buffer.closed = True  # gradients of a backward still to come find no slot
                    self._writer.finish(lambda errors: self._meta("failed" if errors or lost else status,
                                                                  [*errors, *lost]))
            finally:
                _OPEN.discard(self)
                if not _OPEN:
                    termination.uninstall()
                self._writer.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"step {self.step_index}"
        return f"Recorder({type(self.model).__name__}, run={str(self.path)!r}, {len(self.layers)} layers, {state})"

    # ---------------------------------------------------------------- hooks on the model and optimizer

    def _open_run(self, overwrite: bool) -> RunWriter | NoWriter:
        """The run's writer: rank 0's opens the directory; the ranks then agree (one collective)
        on its path and settings, so that either all of them record or all raise."""
        first_meta = self._meta("running")  # before the directory is locked: it may raise
        if not self.processes.writes:
            writer: RunWriter | NoWriter = NoWriter(self.path)
            error = None
        else:
            try:
                writer = RunWriter(self.path, overwrite=overwrite)  # locks the directory
                writer.start(first_meta)
                error = None
            except Exception as exc:
                if self._exchange is None:
                    raise
                writer, error = NoWriter(self.path), exc
        if self._exchange is None:
            return writer
        facts = {"run": str(self.path), "every": self.every, "flush_every": self.flush_every, "per_rank": self.per_rank,
                 "layers": [layer.name for layer in self.layers], "blocks": [block.name for block in self.blocks]}

        def refused(problem: str | None) -> None:
            writer.finish(lambda errors: self._meta("failed", [problem] if problem else errors))
            writer.close()

        self.path = writer.path = Path(self._exchange.start(facts, error, refused))  # rank 0's path
        return writer

    def _model_pre_hook(self, module: nn.Module, args: Any) -> None:
        """Before each forward of the whole model: step bookkeeping that must not wait for a probe.

        Traced into a compiled model it only writes constants: Dynamo guards on every Python value
        it reads, so counting here would recompile the model each step.
        Where Dynamo enters it from Python (a model part it runs uncompiled) it compiles it on its
        own, once, unlike the probes (``compilation.python_when_entered``): that marks the model
        compiled where nothing else may (compiled on a step the schedule skips, probes detached).
        """
        if torch.compiler.is_compiling():  # a hook traced by Dynamo
            self._compiled = True  # pins the probes at the step's end
            if torch.is_grad_enabled():  # (Dynamo replays these writes in every call of the graph)
                self._clock.grad_forward_seen = self._clock.compiled_forward = True
            return
        self._forwards_open += 1
        clock = self._clock
        if self._gradients_read is not None and not self._closure and torch.is_grad_enabled():
            self._advance()  # gradients were read, and the optimizer skipped its step (an AMP scaler found inf)
        if torch.is_grad_enabled():
            clock.grad_forward_seen = True
        self._probes.sync(clock.recording)

    def _model_forward_end(self, module: nn.Module, args: Any, output: Any) -> None:
        self._forwards_open = 0
        if not torch.compiler.is_compiling():
            self._sink.end_forward()

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # step(closure) runs the forward and backward inside (LBFGS, Lightning): read after it
        self._closure = has_closure(args, kwargs)
        if not self._closure:
            self._gradients_at_update()

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._closure:  # (a closure may run several forwards: LBFGS, SAM; all are this step's)
            self._gradients_at_update()
            self._closure = False
        self._advance()
        self._attribute_if_due()

    def _before_scaler_update(self) -> None:
        """End a step the scaler skipped (it found inf), with what its probes measured and the
        scale its backward ran with; its gradients, never applied, are not its parameters'."""
        clock = self._clock
        if not (self._loss_scale.optimizer_in_update() and clock.skipped_by_scaler()):
            return
        if self._gradients_read is None and clock.recording and clock.grad_forward_seen:
            slot = self._sink.slot()
            self._sink.commit()
            if self._staging.used:  # what probes traced into a compiled model staged is this step's
                self._staging.fold(self._buffer, slot)
            self._loss_scale.capture(slot, at_end=True)
        self._advance()

    def _gradients_at_update(self) -> None:
        """The gradients the update uses: the step's statistics, unless read earlier (then the
        norm after the clip, if they were read before it)."""
        if not self._clock.recording:
            return
        if self._gradients_read is None:
            self._end_step(self._sink.slot())
        elif not self._gradients_read:
            self._sink.scalar(self._sink.slot(), GRAD_POST_CLIP_SS, self._parameters.global_grad_ss())

    # ---------------------------------------------------------------- internals

    def _step_in_progress(self) -> bool:
        """Whether the current step has a slot holding part of a step: a forward that did not
        return, or a training step that did not end."""
        return self._clock.step in self._buffer.slots and (self._forwards_open > 0 or self._clock.grad_forward_seen)

    def _advance(self) -> None:
        self._gradients_read = None
        self._clock.advance()
        self._staging.next_step(self._clock.recording)  # what traced probes staged was folded if recorded
        if (self._compiled or self._staging.used) and not self._probes.always:  # used: a part compiled alone
            self._probes.pin()
        self._probes.sync(self._clock.recording)
        if self._exchange is not None:
            self._flush_if_due()

    # ---------------------------------------------------------------- several processes

    def _buffer_full(self) -> None:
        """A new slot is needed and none is free: flush all but the latest (one process), or
        grow (several: a flush is a collective, made only where every rank makes it)."""
        if self._exchange is None:
            self._flush(len(self._buffer.slot_steps) - 1)
            return
        self._sink.commit()
        self._buffer.grow()
        self._loss_scale.step_buf = self._buffer.step

    def _flush_if_due(self) -> None:
        """After a step's end, on every rank alike: flush once flush_every scheduled steps are
        held beside the latest one (evaluation-only slots do not count: they may be one rank's)."""
        every, held = self.every, self._buffer.slot_steps
        scheduled = [i for i, step in enumerate(held) if step % every == 0]
        if len(scheduled) > self.flush_every:
            self._flush(scheduled[-1], limit=held[scheduled[-1]])

    def _end_step(self, slot: int) -> None:
        """A recorded step's end: what the probes measured written, then the parameters."""
        self._sink.commit()
        if self._staging.used:
            self._staging.fold(self._buffer, slot)
        self._sink.scratch.release()  # in case the forward ended somewhere the model's hook did not see
        if not self._parameters_checked:  # fully_shard after watch() swaps the parameters
            self._parameters_checked = True
            if self._parameters.replaced() and self._exchange is not None:
                self.processes = detect(self._wrapped, self.model)
        self._parameters.record(self._buffer, slot)
        if self._micro is not None:
            self._micro.end_step(slot)
        self._loss_scale.note_parameter_gradients(slot)
        refusal = self._hook_check.refusal(self._buffer.counts, slot, self._staging, self._clock, self.path, self.model)
        if refusal is not None:  # hooks a compiled model never runs (recording.compilation)
            self._refusal = refusal
            self._close("failed")
            raise RuntimeError(refusal)

    def _attribute_if_due(self) -> None:
        """Run the attribution checkpoint for the step about to begin, if one is due.

        Called only between steps (never from a forward hook), with gradscope's own probes
        paused so the probe batch leaves no trace in the step statistics.
        """
        probe = self._attribution
        if probe is None or self._clock.step < self._next_attribution:
            return
        with self.paused():
            values = probe()
        self._attribution_done.append((self._clock.step, values))
        every = probe.config.every
        self._next_attribution = (self._clock.step // every + 1) * every

    def _flush(self, upto: int, commit: bool = True, limit: int | None = None) -> None:
        """Hand slots [0, upto) and finished attribution checkpoints to the writer; keep the rest.

        ``commit=False`` (closing after an error) still tries the pending writes, which belong to
        the step in progress once every earlier step ended, but goes on if they fail. In several
        processes the scheduled steps below ``limit`` (required there) are merged over the ranks
        first; every rank must flush at the same step, with the same ``limit``.
        """
        attributed = bool(self._attribution_done)
        if attributed:
            done, self._attribution_done = self._attribution_done, []
            values = [to_host(v) for _, v in done]
            self._writer.submit(AttributionJob(steps=[s for s, _ in done], values=values,
                                               block_names=self._attribution.names,  # type: ignore[union-attr]
                                               method=self._attribution.config.method,  # type: ignore[union-attr]
                                               ready=copies_done(self.device)))
        several = self._exchange is not None and commit  # then every rank takes part, with slots or not
        if upto <= 0 and not several:
            if attributed:  # meta.json counts the new part, so readers take it
                self._writer.submit_meta(self._meta("running"))
            return
        try:
            self._sink.commit()
        except Exception:  # after an error: state an interrupted hook left half-updated, only the dropped step's
            if commit:
                raise
        steps, layer_host, step_host, block_host, counts, ready = self._buffer.take(upto)
        found = self._nonfinite.check(steps, layer_host, counts, ready) if self._exchange is None else []
        by_rank = shared = None
        if self._exchange is not None and commit:
            if ready is not None:
                ready.synchronize()  # the collective reads the host copies
            assert limit is not None, "a flush of several processes names its limit"
            merged = self._exchange.merge(limit, self.every, steps, layer_host, step_host, block_host, counts,
                                          self.per_rank)
            if merged is None:
                return  # not rank 0: nothing to write
            steps, layer_host, step_host, block_host, counts, shared, by_rank = merged
            ready = None
            found = self._nonfinite.check(steps, layer_host, counts, None)  # rank 0, over every rank's data
        self._calls = np.maximum(self._calls, counts.act_calls.max(axis=(0, 1), initial=0))
        if self.blocks:
            self._block_calls = np.maximum(self._block_calls, counts.block_calls.max(axis=0, initial=0))
        self._writer.submit(FlushJob(
            steps=steps, layer_buf=layer_host, step_buf=step_host, block_buf=block_host,
            counts=counts, layer_names=[layer.name for layer in self.layers],
            block_names=[block.name for block in self.blocks], bounded=self._bounded,
            zero_counted=self._zero_counted, ready=ready, by_rank=by_rank, by_rank_steps=shared))
        self._writer.submit_meta(self._meta("running"))
        if found:
            # several processes only warn: a raise on rank 0 alone would leave the others in a collective
            self._nonfinite.report(self.path, may_raise=commit and not self._closed and self._exchange is None)

    def _meta(self, status: str, errors: list[str] | None = None) -> dict[str, Any]:
        return run_meta(self, status, errors)

    def _remove_hooks(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        self._probes.remove()
        self._staging.release(self.model)
        if self._micro is not None:
            self._micro.remove()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("gradscope: this Recorder is closed")

