"""Merging every rank's partial statistics into one, by the rules the schema declares.

Each process of a multi-process job accumulates its own share; at a flush rank 0 merges them
(``recording.exchange``) as if one process had seen every rank's data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradscope.store.schema import COUNT, COUNTS, LAYER, PHASES, STEP, TRAIN, HostCounts, Layout, Merge, Ranks, _ratio


def cell_count(layout: Layout, counts: Any, i: int) -> np.ndarray:
    """The count of accumulator ``i``'s cells as float64, shaped like them (layer counts kept
    per layer only are the train phase's; a step scalar's count is its written-flag)."""
    if layout is STEP:
        return counts.step_set[:, i].astype(np.float64)
    name = layout.accumulators[i].count
    c = getattr(counts, name).astype(np.float64)
    if layout is LAYER and COUNT[name].per == "layer":
        out = np.zeros((c.shape[0], len(PHASES), c.shape[1]))
        out[:, TRAIN] = np.nan_to_num(c)
        return out
    return np.nan_to_num(c)


def merge_ranks(layout: Layout, bufs: list[np.ndarray], counts: list[Any]) -> np.ndarray:
    """One table's accumulators of every rank (``bufs[r]``: ``[slots, ..., width]``, with
    ``counts[r]`` its host counts) merged by their declared rules, as if one process had seen
    every rank's data.

    Cells a rank did not write (count 0) take no part, whatever the buffer held there. Sums add,
    maxima take the max, means and variances merge count-weighted (Chan's update, rank by rank).
    ``Ranks.DATA_GRADIENT`` accumulators are then divided by world^2 (see ``Ranks``).
    """
    width = layout.width
    out = bufs[0].astype(np.float64)
    n_out = [cell_count(layout, counts[0], i) for i in range(width)]
    for buf, rank_counts in zip(bufs[1:], counts[1:]):
        b = buf.astype(np.float64)
        n_b = [cell_count(layout, rank_counts, i) for i in range(width)]
        merged = np.empty_like(out)
        for i, acc in enumerate(layout.accumulators):
            na, nb = n_out[i], n_b[i]
            has_a, has_b = na > 0, nb > 0
            x, y = np.where(has_a, out[..., i], 0.0), np.where(has_b, b[..., i], 0.0)
            if acc.merge is Merge.SUM:
                value = x + y
            elif acc.merge in (Merge.MAX, Merge.MIN):
                pick = np.maximum if acc.merge is Merge.MAX else np.minimum
                value = np.where(has_a & has_b, pick(x, y), np.where(has_a, x, y))
            else:
                w_a, w_b = _ratio(na, na + nb), _ratio(nb, na + nb)
                value = x * w_a + y * w_b
                if acc.merge is Merge.WEIGHTED_VARIANCE:
                    m = layout.index[acc.mean]  # type: ignore[index]
                    delta = np.where(has_b, b[..., m], 0.0) - np.where(has_a, out[..., m], 0.0)
                    value = value + delta * delta * (w_a * w_b)
            merged[..., i] = value
        out = merged
        n_out = [a + c for a, c in zip(n_out, n_b)]
    world = len(bufs)
    for i, acc in enumerate(layout.accumulators):
        if acc.ranks is Ranks.DATA_GRADIENT:
            out[..., i] /= world * world
    return out


def merge_counts(counts: list[Any]) -> HostCounts:
    """Every rank's host counts merged by their declared rules (``over_ranks`` where given;
    flags: any; learning rates: the first known)."""
    first = counts[0]
    out = HostCounts(0, first.layers, first.blocks)
    out.slots = first.slots
    for count in COUNTS:
        values = [getattr(c, count.name) for c in counts]
        if count.over_ranks is Merge.MAX:
            merged = np.max(values, axis=0)
        elif count.merge is Merge.SUM and count.dtype != "bool":
            merged = np.sum(values, axis=0).astype(count.dtype)
        elif count.dtype == "float64":
            merged = values[0].copy()
            for v in values[1:]:
                merged = np.where(np.isnan(merged), v, merged)
        else:
            merged = np.any(values, axis=0)
        setattr(out, count.name, merged)
    return out
