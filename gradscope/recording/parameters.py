"""Parameter and gradient norms of every watched layer, and its learning rate, at a step's end.

``torch._foreach_norm`` computes every norm in one call (per device and dtype); an
``index_add_`` then sums squared norms into the layers' rows of the statistics buffer. Index
tensors are built once per pattern of which parameters have gradients, and copied to the device
without a blocking transfer. Learning rates are read from the optimizer's param groups on the host.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gradscope.recording.buffer import StatsBuffer, device_index
from gradscope.recording.layers import Layer, Ownership, ParameterRow
from gradscope.recording.moments import squared_norms
from gradscope.recording.processes import Holding
from gradscope.store.schema import GRAD_GLOBAL_SS, GRAD_SS, PARAM_SS, TRAIN


class ParameterNorms:
    """Maps the model's parameters to buffer rows so all norms come from batched kernels.

    In a multi-process job (``holding``) only the parameters whose norms count on this rank are
    taken, as their local tensors (a DTensor's shard): rank 0 adds every rank's sums
    (``recording.processes``).
    """

    def __init__(self, model: nn.Module, chosen: list[tuple[Layer, nn.Module | ParameterRow]],
                 optimizer: torch.optim.Optimizer | None, device: torch.device, holding: Holding | None = None,
                 ownership: Ownership | None = None) -> None:
        self.model, self.chosen, self.device, self.holding = model, chosen, device, holding
        self.ownership = ownership or Ownership()
        self.optimizer = optimizer
        self._build()

    def _build(self) -> None:
        model, chosen, optimizer, holding = self.model, self.chosen, self.optimizer, self.holding
        own = self.ownership.own
        if holding is not None:
            holding.refresh()
        self.model_params = list(model.parameters())
        # unique, shared ones once; in several processes those whose norms count here
        self.params: list[Any] = [p for p in self.ownership.parameters(model) if holding is None or holding.counts(p)]
        self._plain = holding is None or holding.is_plain(self.params)
        position = {id(p): i for i, p in enumerate(self.params)}
        pairs = [(position[id(p)], layer.row) for layer, m in chosen for p in own(m) if id(p) in position]
        self.owned = [i for i, _ in pairs]  # parameter index of each (parameter, row) pair
        self.rows = device_index([r for _, r in pairs], self.device)
        self.rows_with_params = np.zeros(len(chosen), bool)
        self.rows_with_params[[r for _, r in pairs]] = True
        self._pair_rows = np.array([r for _, r in pairs], np.int64)
        self._cache: dict[tuple[bool, ...], tuple[Tensor, Tensor, np.ndarray]] = {}

        # learning rate per row: the param group of the row's first own parameter
        self.row_group = np.full(len(chosen), -1, np.int64)
        if optimizer is not None:
            group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
            for layer, m in chosen:
                for p in own(m):
                    key = id(getattr(p, "flat", p))  # a flat segment is optimised as its flat parameter
                    if key in group_of:
                        self.row_group[layer.row] = group_of[key]
                        break

    def replaced(self) -> bool:
        """Rebuild if the model's parameters were replaced since ``watch()`` (``fully_shard``
        applied after it swaps them for DTensors); True when they were."""
        now = list(self.model.parameters())
        if len(now) == len(self.model_params) and all(p is q for p, q in zip(now, self.model_params)):
            return False
        self._build()
        return True

    def record(self, buffer: StatsBuffer, slot: int) -> None:
        """Own-parameter and gradient norms of every row, the global gradient norm and the
        learning rates, into ``slot`` of the buffer and its counts."""
        with torch.no_grad():
            grad_ss, rows_with_grad = self.write_norms(param_col=buffer.layer[slot, TRAIN, :, PARAM_SS],
                                                       grad_col=buffer.layer[slot, TRAIN, :, GRAD_SS])
            buffer.step[slot, GRAD_GLOBAL_SS].copy_(grad_ss)
        counts = buffer.counts
        counts.param_rows[slot] = self.rows_with_params
        counts.grad_rows[slot] = rows_with_grad
        counts.step_set[slot, GRAD_GLOBAL_SS] = True
        counts.lr[slot], counts.step_lr[slot] = self.learning_rates()

    def write_norms(self, param_col: Tensor, grad_col: Tensor) -> tuple[Tensor, np.ndarray]:
        """Write per-row squared norms into the two buffer columns.

        Returns the global squared gradient norm (a device scalar) and which rows had gradients.
        """
        if self._plain:
            owned = [self.params[i] for i in self.owned]
        else:  # DTensors: their local shards (a DTensor's own norm would be a collective)
            local = self.holding.local  # type: ignore[union-attr]
            owned = [local(self.params[i]) for i in self.owned]
        param_col.zero_().index_add_(0, self.rows, squared_norms(owned, self.device))
        # Sparse gradients (nn.Embedding(sparse=True)) have no batched norm: left out, NaN.
        has_grad = tuple(p.grad is not None and not p.grad.is_sparse for p in self.params)
        if has_grad not in self._cache:
            self._cache[has_grad] = self._grad_index(has_grad)
        take, rows, rows_with_grad = self._cache[has_grad]
        if self._plain:
            grads = [p.grad for p, has in zip(self.params, has_grad) if has]
        else:
            local_grad = self.holding.local_grad  # type: ignore[union-attr]
            grads = [local_grad(p) for p, has in zip(self.params, has_grad) if has]
        grad_sq = squared_norms(grads, self.device)
        grad_col.zero_().index_add_(0, rows, grad_sq.index_select(0, take))
        return grad_sq.sum(), rows_with_grad

    def global_grad_ss(self) -> Tensor:
        """The squared global gradient norm as it is now (this rank's share in several processes):
        after ``write_norms`` read the gradients before a framework clipped them."""
        with torch.no_grad():
            if self._plain:
                grads = [p.grad for p in self.params if p.grad is not None and not p.grad.is_sparse]
            else:
                local_grad = self.holding.local_grad  # type: ignore[union-attr]
                grads = [local_grad(p) for p in self.params if p.grad is not None and not p.grad.is_sparse]
            return squared_norms(grads, self.device).sum()

    def _grad_index(self, has_grad: tuple[bool, ...]) -> tuple[Tensor, Tensor, np.ndarray]:
        where = np.cumsum(has_grad) - 1  # position of each parameter's grad in the grad list
        keep = [k for k, i in enumerate(self.owned) if has_grad[i]]
        take = device_index([int(where[self.owned[k]]) for k in keep], self.device)
        rows = device_index([int(self._pair_rows[k]) for k in keep], self.device)
        rows_with_grad = np.zeros_like(self.rows_with_params)
        rows_with_grad[self._pair_rows[keep]] = True
        return take, rows, rows_with_grad

    def learning_rates(self) -> tuple[np.ndarray, float]:
        """Per-row learning rate and the first group's, as host floats (NaN where unknown)."""
        if self.optimizer is None:
            return np.full(len(self.row_group), np.nan), float("nan")
        lrs = np.array([_host_float(g.get("lr")) for g in self.optimizer.param_groups] + [np.nan])
        return lrs[self.row_group], float(lrs[0])


def _host_float(value: Any) -> float:
    """A learning rate as a float without waiting on a device (CUDA tensors give NaN)."""
    if isinstance(value, Tensor):
        return float(value) if value.device.type == "cpu" else float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
