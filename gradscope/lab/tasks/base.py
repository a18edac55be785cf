"""What a task is: batches for training, a held-out set, and the model settings it implies."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

Batch = tuple[Any, Tensor]  # (input, integer targets); input is a tensor or a (source, target) pair


@dataclass
class Task:
    """A built-in dataset held in memory as tensors.

    ``inputs`` are [N, ...] tensors (a tuple of them for encoder-decoder tasks) and ``targets``
    [N] or [N, T] class indices, with -100 where no prediction is scored (F.cross_entropy's
    ignore_index). ``model_overrides`` are the reference-model settings the data implies
    (classes, vocabulary, sequence length, image size).
    """

    name: str
    input_kind: str  # "image", "tokens", "lm" or "seq2seq" (see gradscope.lab.models.registry)
    train_inputs: Any
    train_targets: Tensor
    test_inputs: Any
    test_targets: Tensor
    model_overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def train_size(self) -> int:
        return len(self.train_targets)

    def batches(self, batch_size: int, seed: int = 0) -> Iterator[Batch]:
        """An endless stream of shuffled training batches (reshuffled every epoch)."""
        g = torch.Generator().manual_seed(seed)
        n = self.train_size
        while True:
            order = torch.randperm(n, generator=g)
            for start in range(0, n - batch_size + 1, batch_size):
                idx = order[start:start + batch_size]
                yield _take(self.train_inputs, idx), self.train_targets[idx]

    def test_batches(self, batch_size: int) -> Iterator[Batch]:
        n = len(self.test_targets)
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(start + batch_size, n))
            yield _take(self.test_inputs, idx), self.test_targets[idx]


def _take(inputs: Any, idx: Tensor) -> Any:
    if isinstance(inputs, tuple):
        return tuple(t[idx] for t in inputs)
    return inputs[idx]
