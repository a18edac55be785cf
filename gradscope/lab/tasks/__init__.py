"""Built-in data, made locally or read from a local directory: nothing is downloaded.

``get_task(name, input_kind, **options)`` returns a ``Task``; ``TASKS`` lists what exists and
which kinds of model each one fits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradscope.lab.tasks.base import Batch, Task
from gradscope.lab.tasks.cifar import CifarFormatError, cifar10
from gradscope.lab.tasks.images import synthetic_images
from gradscope.lab.tasks.sequences import copy_task, dyck_task, majority_task

# name -> (input kinds it serves, one-line description)
TASKS: dict[str, tuple[tuple[str, ...], str]] = {
    "images": (("image",), "synthetic CIFAR-shaped images, 10 classes"),
    "cifar10": (("image",), "CIFAR-10 from a local directory (--data-dir)"),
    "copy": (("seq2seq", "lm"), "copy a random token string"),
    "reverse": (("seq2seq", "lm"), "reverse a random token string"),
    "dyck": (("lm",), "next token of balanced bracket strings (a generated grammar)"),
    "majority": (("tokens",), "classify a token string by its most frequent token"),
}
#: The task a model trains on when none is named, by the model's input kind.
DEFAULT_TASK = {"image": "images", "lm": "dyck", "seq2seq": "reverse", "tokens": "majority"}


class UnknownTaskError(ValueError):
    """No such task, or the task does not fit the model."""


def check_task(name: str, input_kind: str, *, data_dir: str | None = None) -> None:
    """Refuse an unknown task, one that does not fit ``input_kind`` models, or cifar10 without a
    directory, without making or reading any data."""
    if name not in TASKS:
        raise UnknownTaskError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    kinds = TASKS[name][0]
    if input_kind not in kinds:
        raise UnknownTaskError(f"task {name!r} is for {'/'.join(kinds)} models, not {input_kind} models; "
                               f"try {DEFAULT_TASK[input_kind]!r}")
    if name == "cifar10" and data_dir is None:
        raise UnknownTaskError("task 'cifar10' reads a local copy: give --data-dir (the cifar-10-batches-py folder)")


def get_task(name: str, input_kind: str, *, data_dir: str | None = None, seed: int = 0,
             **options: Any) -> Task:
    """Build task ``name`` for a model taking ``input_kind`` inputs."""
    check_task(name, input_kind, data_dir=data_dir)
    if name == "cifar10":
        return cifar10(data_dir)  # type: ignore[arg-type]  (checked above)
    makers: dict[str, Callable[..., Task]] = {
        "images": lambda: synthetic_images(seed=seed, **options),
        "copy": lambda: copy_task(False, input_kind, seed=seed, **options),
        "reverse": lambda: copy_task(True, input_kind, seed=seed, **options),
        "dyck": lambda: dyck_task(seed=seed, **options),
        "majority": lambda: majority_task(seed=seed, **options),
    }
    return makers[name]()


__all__ = ["Batch", "CifarFormatError", "DEFAULT_TASK", "TASKS", "Task", "UnknownTaskError", "check_task", "get_task"]
