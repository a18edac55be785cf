"""How a compiled backward hands its statistics to the staging: an opaque op keyed by integers.

A traced tensor hook that adds ||dL/dy||^2 into the staging makes the staging a graph input
mutated in the backward. AOTAutograd then saves it for the backward, with a check that no one
changed it in between (its version counter). A model Dynamo compiles into several graphs (any
graph break: a ``print``, data-dependent Python, FSDP2's hooks) has every graph write the
staging in its forward, so the backward of the first graph failed "modified by an inplace
operation" (torch 2.13, any backend but ``eager``). So the hooks call ``gradscope::deposit``
instead, which names its staging and cells by integers (the staging's ``key``, the kind, the
row): no graph takes the staging as an input for its backward. The op has no output, so it is
registered as a side effect, which keeps it out of dead-code elimination. Its kernel adds into
views that stay at fixed addresses, so a CUDA graph replays the same adds.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

from torch import Tensor

from gradscope.recording import traced_statistics as formulas

#: what a deposit adds: a layer's ||dL/dy||^2, a block's ||dL/dx||^2 or ||dL/dy||^2
LAYER_GRAD_OUT, BLOCK_GRAD_IN, BLOCK_GRAD_OUT = 0, 1, 2

_STAGINGS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def register(staging: Any) -> int:
    """A key for ``staging`` that the op's kernel looks up (weakly: a dropped recorder's goes)."""
    key = next(_KEYS)
    _STAGINGS[key] = staging
    return key


def release(key: int) -> None:
    """The recorder closed: a graph compiled for it that still runs deposits nothing."""
    _STAGINGS.pop(key, None)


def deposit(staging: Any, kind: int, row: int, squares: Tensor, elements: Any) -> None:
    """Add ``squares`` (and a call, and ``elements`` for a layer) to the staging's cells: from a
    traced backward hook through the op, elsewhere (no op before torch 2.5) directly."""
    if _deposit_op is not None:
        _deposit_op(squares, elements, staging.key, kind, row)
    else:
        _add(staging.backward_cells(kind, row), squares, elements)


def _add(cells: tuple[Tensor, Tensor | None, Tensor], squares: Tensor, elements: Any) -> None:
    total, seen, calls = cells
    total.add_(squares)
    if seen is not None:
        seen.add_(elements)
    calls.add_(1)


def open_staging(key: int) -> Any:
    """In an op's kernel, at run time: the staging named ``key``, or None where its recorder closed
    or its gate is closed (``gated``, CPU: a step the schedule skips, whose staging is zeroed unread)."""
    staging = _STAGINGS.get(key)
    return staging if staging is not None and (staging.gate is None or staging.gate.open) else None


def add(staging: Any, kind: int, row: int, squares: Tensor, elements: Any) -> None:
    """What a deposit does, for a kernel that found its staging open (``gated``)."""
    _add(staging.backward_cells(kind, row), squares, elements)


def _deposit(squares: Tensor, elements: int, key: int, kind: int, row: int) -> None:
    staging = open_staging(key)
    if staging is not None:
        add(staging, kind, row, squares, elements)


# None on an older torch: the hooks add into the staging themselves
_deposit_op = formulas.opaque_op("deposit", "(Tensor squares, SymInt elements, int key, int kind, int row) -> ()",
                                 _deposit, lambda *args: None, dispatch="CompositeExplicitAutograd")  # any device
