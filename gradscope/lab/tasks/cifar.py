"""Reader for a local CIFAR-10 directory in the standard "python version" batch format.

The official files (``data_batch_1`` .. ``data_batch_5``, ``test_batch``) are Python pickles of
dicts holding a uint8 array and a list of labels. Unpickling can run arbitrary code, so the
reader's unpickler builds only what those files contain (numpy arrays, dtypes, plain
containers) and refuses anything else with the name of the file. Nothing is downloaded.
"""

from __future__ import annotations

import io
import pickle  # restricted below: only numpy arrays and builtins, for CIFAR's own files
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

_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class CifarFormatError(ValueError):
    """A file in the CIFAR-10 directory is missing, damaged, or holds something else."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch")


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 3, 32, 32] uint8 and labels [N] from one batch file."""
    try:
        raw = path.read_bytes()
        batch = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except FileNotFoundError:
        raise CifarFormatError(f"{path} is missing (expected the CIFAR-10 python batches)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise CifarFormatError(f"{path} is not a CIFAR-10 batch file: {exc}") from None
    if not isinstance(batch, dict):
        raise CifarFormatError(f"{path} is not a CIFAR-10 batch file: expected a dict")
    data, labels = batch.get(b"data", batch.get("data")), batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or not isinstance(labels, (list, tuple, np.ndarray)):
        raise CifarFormatError(f"{path} lacks the 'data' array or the 'labels' list")
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
