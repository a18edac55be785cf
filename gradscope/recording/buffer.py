"""The statistics buffer: where every recorded number lives on the device until a flush.

One allocation holds the layer statistics ``[slots, phases, layers, LAYER.width]`` followed by
the block statistics ``[slots, blocks, BLOCK.width]`` (so a batched kernel can address any
element of either by its offset); a second holds the step scalars ``[slots, STEP.width]``.
Columns are the schema's accumulators (``store.schema``). A slot holds one recorded step; the
host keeps the ``HostCounts`` of each slot beside it, so nothing here reads the device.

Per-sample block terms and first-call activation moments are kept pending and written for all
blocks and layers at once (``commit_moments``, ``commit_blocks``): a few kernels per step
instead of a dozen per block. ``take`` hands the finished slots to the host with non-blocking
copies and moves the unfinished one down.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradscope.recording.device_counts import add_device_counts
from gradscope.recording.identity import identity_terms, token_cosines, token_direction_norms
from gradscope.store.schema import (
    B_COS_SUM,
    B_DIFF_SS,
    B_TOKEN_COS_SUM,
    BLOCK,
    COUNTS,
    LAYER,
    PHASES,
    STEP,
    HostCounts,
)

_MAX_CACHED_VIEWS = 50_000  # buffer views kept (a few MB of Python objects at most)
_MAX_CACHED_INDICES = 128


class StatsBuffer:
    """Device statistics of up to ``capacity`` recorded steps, and what the host knows of them."""

    def __init__(self, capacity: int, layers: int, blocks: int, device: torch.device) -> None:
        self.capacity, self.layers, self.blocks, self.device = capacity, layers, blocks, device
        layer_size, block_size = capacity * len(PHASES) * layers * LAYER.width, capacity * blocks * BLOCK.width
        self.flat = torch.zeros(layer_size + block_size, device=device)
        self.block_base = layer_size  # offset of the block statistics in ``flat``
        self.layer = self.flat[:layer_size].view(capacity, len(PHASES), layers, LAYER.width)
        self.block = self.flat[layer_size:].view(capacity, blocks, BLOCK.width)
        self.step = torch.zeros(capacity, STEP.width, device=device)
        # Strides, so a probe reaches its row with one slice of ``flat`` instead of an index
        # chain (each indexing op is a dispatcher call, and probes run hundreds per step).
        self.layer_strides = (len(PHASES) * layers * LAYER.width, layers * LAYER.width, LAYER.width)
        self.counts = HostCounts(capacity, layers, blocks)
        self.slot_steps: list[int] = []  # step number held in each used slot
        self.slots: dict[int, int] = {}  # step number -> slot
        self.closed = False  # set when the recorder closes: late gradient hooks find no slot
        # Activation moments of this step's first calls, (slot, offset within the slot, scalars),
        # and per-block terms (slot, row, values): written for all at once by the commits.
        self.pending_moments: list[tuple[int, int, list[Tensor]]] = []
        self.pending_identity: list[tuple[int, int, Tensor]] = []
        self.pending_tokens: list[tuple[int, int, tuple[Tensor, int]]] = []  # (token sums, tokens)
        # Counts the traced probes of a compiled model keep on the device ([slots, width] int64,
        # ``recording.traced``), made at the first fold; added to the host's at the flush.
        self.device_counts: Tensor | None = None
        self._views: dict[tuple[bool, int, int], Tensor] = {}
        self._index_cache: dict[tuple[str, tuple[tuple[int, int], ...]], Tensor] = {}

    # ------------------------------------------------------------------ slots

    def full(self) -> bool:
        return len(self.slot_steps) == self.capacity

    def open(self, step: int) -> int:
        """A fresh slot for ``step`` (the buffer must not be full)."""
        slot = len(self.slot_steps)
        self.slot_steps.append(step)
        self.slots[step] = slot
        self.counts.clear(slot)
        if self.blocks:
            self.block[slot].zero_()  # block statistics are pure sums
        if self.device_counts is not None:
            self.device_counts[slot].zero_()
        return slot

    def device_counts_of(self, width: int) -> Tensor:
        """The device counts of every slot (``recording.traced``), made on first use."""
        if self.device_counts is None:
            self.device_counts = torch.zeros(self.capacity, width, dtype=torch.int64, device=self.device)
        return self.device_counts

    def grow(self) -> None:
        """Twice the slots, contents kept. A recorder of several processes cannot flush alone when
        evaluations off the schedule fill its buffer (a flush is a collective), so it grows
        instead. The counts object stays the same (the sink and the loss scale hold it); the
        device tensors are new, and cached views and indices are dropped."""
        bigger = StatsBuffer(self.capacity * 2, self.layers, self.blocks, self.device)
        bigger.layer[:self.capacity].copy_(self.layer)
        bigger.block[:self.capacity].copy_(self.block)
        bigger.step[:self.capacity].copy_(self.step)
        if self.device_counts is not None:
            bigger.device_counts_of(self.device_counts.shape[1])[:self.capacity].copy_(self.device_counts)
        for count in COUNTS:
            getattr(bigger.counts, count.name)[:self.capacity] = getattr(self.counts, count.name)
            setattr(self.counts, count.name, getattr(bigger.counts, count.name))
        self.counts.slots = bigger.capacity
        self.capacity, self.flat, self.block_base = bigger.capacity, bigger.flat, bigger.block_base
        self.layer, self.block, self.step = bigger.layer, bigger.block, bigger.step
        self.device_counts = bigger.device_counts
        self._views.clear()
        self._index_cache.clear()

    def slot_of(self, step: int) -> int | None:
        """The slot of ``step``; None once it was flushed, or the recorder closed."""
        return None if self.closed else self.slots.get(step)

    def take(self, upto: int) -> tuple[list[int], Tensor, Tensor, Tensor, HostCounts, Any]:
        """Host copies of slots [0, upto), their steps and counts, and a CUDA event after the
        copies (None where copies are synchronous); the rest move down to slot 0."""
        counts = self.counts.take(upto)
        buffers: tuple[Tensor, ...] = (self.layer, self.step, self.block)
        if self.device_counts is not None:  # a flush may wait for the device: on CUDA, this one does
            add_device_counts(counts, self.device_counts[:upto].cpu().numpy(), self.layers, self.blocks)
            buffers += (self.device_counts,)
        layer_host, step_host, block_host = (to_host(b[:upto]) for b in buffers[:3])
        ready = copies_done(self.device)
        steps, rest = self.slot_steps[:upto], self.slot_steps[upto:]
        for i in range(len(rest)):  # move the unfinished step down to slot i
            for b in buffers:
                b[i].copy_(b[upto + i])
            self.counts.move(upto + i, i)
        self.slot_steps = rest
        self.slots = {step: i for i, step in enumerate(rest)}
        return steps, layer_host, step_host, block_host, counts, ready

    # ------------------------------------------------------------------ addressing

    def layer_offset(self, slot: int, phase: int, row: int) -> int:
        """Offset in ``flat`` of a layer row's first column."""
        a, b, c = self.layer_strides
        return slot * a + phase * b + row * c

    def block_offset(self, slot: int, row: int) -> int:
        """Offset of a block row's first column, from ``block_base``."""
        return (slot * self.blocks + row) * BLOCK.width

    def view(self, blocks: bool, start: int, length: int = 0) -> Tensor:
        """``length`` elements from offset ``start`` of the layer statistics (of the block
        statistics with ``blocks``), or the scalar there. Views are cached: creating one is a
        dispatcher call, and a dict lookup is far cheaper (the buffer is never reallocated)."""
        key = (blocks, start, length)
        view = self._views.get(key)
        if view is None:
            at = start + self.block_base if blocks else start
            view = self.flat[at: at + length] if length else self.flat[at]
            if len(self._views) < _MAX_CACHED_VIEWS:
                self._views[key] = view
        return view

    def pattern_index(self, kind: str, pattern: tuple[tuple[int, int], ...]) -> Tensor:
        """Device index for a pattern of pending entries, which repeats from step to step, so it
        is built and copied to the device once. ``"elements"``: the buffer elements of (offset,
        length) runs; ``"samples"``: the block row of every sample of (row, samples) entries."""
        key = (kind, pattern)
        index = self._index_cache.get(key)
        if index is None:
            if len(self._index_cache) > _MAX_CACHED_INDICES:
                self._index_cache.clear()
            if kind == "elements":
                values = np.concatenate([np.arange(offset, offset + length) for offset, length in pattern])
            else:
                values = np.repeat([row for row, _ in pattern], [n for _, n in pattern])
            index = self._index_cache[key] = device_index(values, self.device)
        return index

    # ------------------------------------------------------------------ pending work

    def commit_moments(self) -> None:
        """Write the pending activation moments into the layer statistics: a stack and an index
        copy per slot (the offsets repeat from step to step, so their device index is built once)."""
        per_slot = self.layer_strides[0]
        for slot, items in _take_by_slot(self.pending_moments).items():
            values = torch.stack([part for _, parts in items for part in parts])
            index = self.pattern_index("elements", tuple((offset, len(parts)) for offset, parts in items))
            self.view(False, slot * per_slot, per_slot).index_copy_(0, index, values)

    def commit_blocks(self) -> None:
        """Sum the pending per-sample identity terms and token cosines into the block statistics."""
        for slot, items in _take_by_slot(self.pending_identity).items():
            squares = torch.cat([v for _, v in items], dim=-1) if len(items) > 1 else items[0][1]
            self._add_samples(slot, slice(B_DIFF_SS, B_COS_SUM + 1), identity_terms(squares),
                              [(row, v.shape[-1]) for row, v in items])
        for slot, items in _take_by_slot(self.pending_tokens).items():
            norms = token_direction_norms([z for _, (z, _) in items])
            lengths = {t for _, (_, t) in items}
            tokens: Any = lengths.pop() if len(lengths) == 1 else torch.cat(  # sequences of several lengths
                [torch.full((z.shape[0],), float(t), dtype=norms.dtype, device=norms.device)
                 for _, (z, t) in items])
            self._add_samples(slot, B_TOKEN_COS_SUM, token_cosines(norms, tokens),
                              [(row, z.shape[0]) for row, (z, _) in items])

    def _add_samples(self, slot: int, columns: Any, terms: Tensor, rows: list[tuple[int, int]]) -> None:
        """Add per-sample ``terms`` into the block statistics, each sample to its (row, samples) entry's row."""
        index = self.pattern_index("samples", tuple(rows))
        self.block[slot][:, columns].index_add_(0, index, terms)


def _take_by_slot(pending: list[tuple[Any, ...]]) -> dict[int, list[tuple[Any, Any]]]:
    """Empty a pending list of (slot, key, value) into {slot: [(key, value), ...]}, in order."""
    by_slot: dict[int, list[tuple[Any, Any]]] = {}
    for slot, key, value in pending:
        by_slot.setdefault(slot, []).append((key, value))
    pending.clear()
    return by_slot


def device_index(values: Any, device: torch.device) -> Tensor:
    """An int64 index tensor on ``device``, copied without a blocking host transfer."""
    t = torch.as_tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_host(t: Tensor) -> Tensor:
    """A host copy of ``t``; from CUDA it is pinned and may still be in flight."""
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t.detach(), non_blocking=True)
    return t.detach().to("cpu", copy=True)


def copies_done(device: torch.device) -> Any:
    """A CUDA event after the copies just queued on ``device`` (None where copies are synchronous)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event
