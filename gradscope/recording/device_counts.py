"""Counts kept on the device: where the traced probes of a compiled model count what they saw.

A compiled graph cannot add to the host's ``HostCounts`` (a Python value it changed would be a
guard), so the traced path (``recording.traced``) counts elements and calls in one int64 vector
per buffer slot; a flush, which may wait for the device, adds them into the host's counts.
"""

from __future__ import annotations

import numpy as np

from gradscope.store.schema import COUNT, PHASES, HostCounts

#: The host counts the traced path keeps on the device instead (the others are the host's alone).
DEVICE_COUNTS = ("act_n", "act_calls", "grad_n", "grad_calls", "block_calls", "block_samples",
                 "block_grad_in", "block_grad_out", "block_branch", "block_tokens")


def count_shapes(layers: int, blocks: int) -> list[tuple[str, tuple[int, ...], int, int]]:
    """(name, shape, offset, size) of each device count in the flat vector of one slot."""
    shapes = {"phase_layer": (len(PHASES), layers), "layer": (layers,), "block": (blocks,)}
    out, offset = [], 0
    for name in DEVICE_COUNTS:
        shape = shapes[COUNT[name].per]
        size = int(np.prod(shape))
        out.append((name, shape, offset, size))
        offset += size
    return out


def count_width(layers: int, blocks: int) -> int:
    """Elements of one slot's vector."""
    return sum(size for _, _, _, size in count_shapes(layers, blocks))


def add_device_counts(counts: HostCounts, device_counts: np.ndarray, layers: int, blocks: int) -> None:
    """Add the device counts of some slots ([slots, width], copied to the host) into ``counts``."""
    for name, shape, offset, size in count_shapes(layers, blocks):
        host = getattr(counts, name)
        host += device_counts[:, offset:offset + size].reshape(len(device_counts), *shape)
