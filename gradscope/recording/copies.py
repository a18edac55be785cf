"""What a copy of a watched module has where gradscope's hooks were: a hook that does nothing.

Users copy models in the middle of training: ``copy.deepcopy(model)`` for an EMA model or a
best-model snapshot, ``torch.save(model)`` of the whole module. A module's hooks come along with
it, and gradscope's hold the recorder: its lock, open files and device buffers, which cannot be
copied (``TypeError: cannot pickle '_thread.lock' object``), and which must not take the copy's
forwards into the run anyway. So every hook gradscope puts on a module is a ``NotCopied``, whose
copy (deep, or through pickle) is ``unwatched``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def unwatched(*args: Any, **kwargs: Any) -> None:
    """The hook a copy of a watched module has in place of each of gradscope's: it does nothing
    (a hook returning None leaves the module's inputs and output as they were)."""


def _unwatched() -> Callable[..., None]:
    return unwatched


class NotCopied:
    """A hook on a user's module whose copy is ``unwatched``: the copy is not watched."""

    __slots__ = ()

    def __deepcopy__(self, memo: dict[int, Any]) -> Callable[..., None]:
        return unwatched

    def __reduce__(self) -> tuple[Callable[[], Callable[..., None]], tuple[()]]:
        return _unwatched, ()


class MethodHook(NotCopied):
    """A bound method as a module hook, copied as ``unwatched`` (a bound method would copy its
    object). Each place subclasses it with a ``__call__`` of its own: Dynamo keeps the frames it
    compiles on their own per code object, and hooks of different places must not share one (nor
    its recompile limit)."""

    __slots__ = ("method",)

    def __init__(self, method: Callable[..., Any]) -> None:
        self.method = method
