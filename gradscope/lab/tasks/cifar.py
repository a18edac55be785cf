"""Reader for a local CIFAR-10 directory in the standard "python version" batch format.

The official files (``data_batch_1`` .. ``data_batch_5``, ``test_batch``) are Python pickles of
dicts holding a uint8 array and a list of labels. Unpickling can run arbitrary code, so the
reader's unpickler builds only what those files contain (numpy arrays, dtypes, plain
containers) and refuses anything else with the name of the file. A pickle can also ask numpy for
any amount of memory in a few bytes, so only regular files of bounded size are read, and every
array's size is checked against the bytes the file holds before numpy allocates it. Nothing is
downloaded.
"""

from __future__ import annotations

import io
import math
import os
import pickle  # restricted below: only numpy arrays and builtins, for CIFAR's own files
import stat
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradscope.lab.tasks.base import Task

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
# Per-channel mean and std of the CIFAR-10 training set, for the usual normalisation.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
#: Largest batch file read: an official batch is 31 MB (10,000 images of 3,072 bytes).
MAX_BATCH_BYTES = 256 * 2**20

_RECONSTRUCT = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}
_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"), *_RECONSTRUCT,
}


class CifarFormatError(ValueError):
    """A file in the CIFAR-10 directory is missing, damaged, or holds something else."""


class _PickledArray(np.ndarray):
    """The only array class the unpickler builds: its state is checked before numpy allocates it.

    numpy's pickles make an empty array (``_reconstruct``) and fill it from the file's bytes
    (``__setstate__``); a forged state could name any shape, so the bytes must match it exactly.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> _PickledArray:  # a direct call would allocate any shape
        raise pickle.UnpicklingError("arrays are built only the way numpy pickles them")

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise pickle.UnpicklingError("unexpected array state")
        _, shape, dtype, _, data = state
        if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
            raise pickle.UnpicklingError("only arrays of plain numbers are read")
        if _nbytes(shape, dtype) != len(data):
            raise pickle.UnpicklingError(f"an array of shape {shape} does not match its {len(data)} bytes")
        super().__setstate__(state)


def _nbytes(shape: Any, dtype: Any) -> int:
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise pickle.UnpicklingError(f"bad array shape {shape!r}")
    if not isinstance(dtype, (np.dtype, str, bytes)):
        raise pickle.UnpicklingError(f"bad array dtype {dtype!r}")
    return math.prod(shape) * np.dtype(dtype if not isinstance(dtype, bytes) else dtype.decode("ascii")).itemsize


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, raw: bytes) -> None:
        super().__init__(io.BytesIO(raw), encoding="bytes")
        self.limit = len(raw)  # no array holds more than the file's bytes

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch")
        found = super().find_class(module, name)
        if (module, name) == ("numpy", "ndarray"):
            return _PickledArray
        if (module, name) in _RECONSTRUCT:
            return lambda subtype, shape, dtype: self._reconstruct(found, subtype, shape, dtype)
        if name == "encode":  # numpy's protocol-2 pickles carry bytes as latin-1 text
            return lambda text, encoding: found(text, encoding) if encoding in ("latin1", "latin-1") else \
                _refuse(f"encoding {encoding!r}")
        return found

    def _reconstruct(self, real: Any, subtype: Any, shape: Any, dtype: Any) -> Any:
        if subtype is not _PickledArray:
            raise pickle.UnpicklingError(f"refusing to build {subtype!r}: not part of a CIFAR-10 batch")
        if _nbytes(shape, dtype) > self.limit:
            raise pickle.UnpicklingError(f"refusing an array of shape {shape!r}: larger than the file")
        return real(subtype, shape, dtype)


def _refuse(what: str) -> Any:
    raise pickle.UnpicklingError(f"refusing {what}: not part of a CIFAR-10 batch")


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, if it is a regular file of at most MAX_BATCH_BYTES.

    Opened without blocking and checked on the open descriptor: a FIFO would wait forever for a
    writer, and a device such as /dev/zero never ends.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise CifarFormatError(f"{path} is missing (expected the CIFAR-10 python batches)") from None
    except OSError as exc:
        raise CifarFormatError(f"{path} cannot be read: {exc.strerror or exc}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise CifarFormatError(f"{path} is not a regular file (expected a CIFAR-10 batch file)")
    with os.fdopen(fd, "rb") as file:
        raw = file.read(MAX_BATCH_BYTES + 1) if info.st_size <= MAX_BATCH_BYTES else b""
    if info.st_size > MAX_BATCH_BYTES or len(raw) > MAX_BATCH_BYTES:  # (the second: it grew while read)
        raise CifarFormatError(f"{path} holds more than {MAX_BATCH_BYTES:,} bytes: not a CIFAR-10 batch file")
    return raw


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 3, 32, 32] uint8 and labels [N] from one batch file."""
    path = Path(path)
    raw = _read_bytes(path)
    try:
        batch = _NumpyOnlyUnpickler(raw).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError, RecursionError) as exc:
        raise CifarFormatError(f"{path} is not a CIFAR-10 batch file: {exc or type(exc).__name__}") from None
    if not isinstance(batch, dict):
        raise CifarFormatError(f"{path} is not a CIFAR-10 batch file: expected a dict")
    data, labels = batch.get(b"data", batch.get("data")), batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or not isinstance(labels, (list, tuple, np.ndarray)):
        raise CifarFormatError(f"{path} lacks the 'data' array or the 'labels' list")
    data = data.view(np.ndarray)
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1:
            raise CifarFormatError(f"{path}: labels are an array of shape {labels.shape}; expected [N]")
        labels = labels.view(np.ndarray)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise CifarFormatError(f"{path}: data is {data.dtype} {data.shape} for {len(labels)} labels; "
                               "expected uint8 [N, 3072] and N labels")
    if not all(isinstance(v, (int, np.integer)) and 0 <= v < 10 for v in labels):
        raise CifarFormatError(f"{path}: labels must be integers from 0 to 9")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def cifar10(data_dir: str | Path, train_files: tuple[str, ...] = TRAIN_FILES) -> Task:
    """CIFAR-10 from ``data_dir`` (the extracted ``cifar-10-batches-py`` folder), normalised."""
    root = Path(data_dir)
    if not root.is_dir():
        raise CifarFormatError(f"CIFAR-10 directory {root} not found")
    parts = [read_batch(root / name) for name in train_files]
    x_test, y_test = read_batch(root / TEST_FILE)
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)

    def prep(x: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(x).float() / 255 - mean) / std

    return Task("cifar10", "image", prep(x_train), torch.from_numpy(y_train), prep(x_test),
                torch.from_numpy(y_test), model_overrides={"num_classes": 10, "in_channels": 3, "input_size": 32},
                description=f"CIFAR-10 from {root}")
