"""Several processes (torchrun): who this process is, which wrapper shards the model, and which
part of each parameter this process holds (docs/design.md, "Several processes").

Under ``torchrun`` every rank calls ``watch()`` as it would in one process. The facts it needs
come from ``torch.distributed`` and the wrappers themselves, never from a launcher of ours:

- ``Processes``: world size and rank; only global rank 0 writes the run.
- Names: DDP (``module.``), FSDP1 (``_fsdp_wrapped_module.``), ``torch.compile``
  (``_orig_mod.``) and checkpoint wrappers add prefixes; ``user_name`` removes them so a
  multi-process run lines up with a one-process run of the same model. FSDP2 renames classes
  (``FSDPLinear``); ``user_class`` gives the user's.
- ``FlatSegment``: FSDP1 without ``use_orig_params`` flattens a wrapped module's parameters into
  one ``FlatParameter``; a segment is one original parameter's part of this rank's shard, so
  every layer keeps its own parameters (``fsdp1_segments``).
- ``Holding``: a parameter's local tensor (a DTensor's shard, an FSDP1 flat shard) and whether
  its squared norm *counts* on this rank. A sharded parameter counts on the ranks that hold
  distinct shards of it (coordinate 0 on every replicated mesh dimension); a replicated one on
  global rank 0 only. Summing what counts over all ranks then gives the full tensor's squared
  norm, with no collective per parameter.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

#: Wrapper attributes that appear in qualified names between a user's modules.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_orig_mod", "_checkpoint_wrapped_module")
_WRAPPER_RE = re.compile(r"(^|\.)(" + "|".join(_WRAPPER_SEGMENTS) + r")(?=\.|$)")


def user_name(name: str) -> str:
    """A qualified module or parameter name without the wrappers' segments."""
    return _WRAPPER_RE.sub("", name).lstrip(".") if "_" in name else name


def modules_by_user_name(model: nn.Module) -> dict[str, nn.Module]:
    """``model``'s modules by their user names: a wrapper and the module it wraps share one, and
    the module (named after it) wins."""
    return {user_name(name): m for name, m in model.named_modules()}


def inner_module(module: nn.Module) -> nn.Module:
    """The user's module inside wrappers that hold it as a child (FSDP1, checkpoint, compile)."""
    while True:
        inner = next((getattr(module, a) for a in _WRAPPER_SEGMENTS if isinstance(getattr(module, a, None), nn.Module)),
                     None)
        if inner is None:
            return module
        module = inner


def user_class(module: nn.Module) -> type:
    """The user's class of a wrapped module (FSDP1, checkpoint, compile), or of one that FSDP2
    re-classed (``FSDPLinear`` -> ``Linear``)."""
    module = inner_module(module)
    cls = type(module)
    fsdp_module = _fsdp2_module_class()
    if fsdp_module is not None and isinstance(module, fsdp_module):
        for base in cls.__bases__:
            if base is not fsdp_module:
                return base
    return cls


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside ``DistributedDataParallel`` (whose forward calls it unchanged)."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


@dataclass(frozen=True)
class Processes:
    """This process's place in the job (one process: world size 1, rank 0)."""

    world_size: int = 1
    rank: int = 0
    backend: str | None = None
    wrappers: tuple[str, ...] = ()  # e.g. ("DistributedDataParallel",), ("fully_shard",)
    mesh_shape: tuple[int, ...] | None = None  # FSDP2/HSDP device mesh
    mesh_dim_names: tuple[str, ...] | None = None
    group: Any = field(default=None, compare=False, repr=False)  # the default process group

    @property
    def several(self) -> bool:
        return self.world_size > 1

    @property
    def writes(self) -> bool:
        """Only global rank 0 writes the run directory."""
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        """For meta.json's ``env.processes``."""
        return {"world_size": self.world_size, "backend": self.backend, "wrappers": list(self.wrappers),
                "mesh_shape": list(self.mesh_shape) if self.mesh_shape else None,
                "mesh_dim_names": list(self.mesh_dim_names) if self.mesh_dim_names else None}


def detect(model: nn.Module, watched: nn.Module) -> Processes:
    """The job ``model`` trains in: one process unless ``torch.distributed`` is initialised."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return Processes()
    wrappers: list[str] = []
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        wrappers.append("DistributedDataParallel")
    fsdp2, fsdp1 = _fsdp2_module_class(), _fsdp1_class()
    modules = list(watched.modules())
    if fsdp2 is not None and any(isinstance(m, fsdp2) for m in modules):
        wrappers.append("fully_shard")
    if fsdp1 is not None and any(isinstance(m, fsdp1) for m in modules):
        wrappers.append("FullyShardedDataParallel")
    shape = names = None
    dtensor = _dtensor_class()
    for p in watched.parameters():
        if dtensor is not None and isinstance(p, dtensor):
            mesh = p.device_mesh
            shape, names = tuple(mesh.shape), tuple(mesh.mesh_dim_names) if mesh.mesh_dim_names else None
            break
    return Processes(world_size=dist.get_world_size(), rank=dist.get_rank(), backend=str(dist.get_backend()),
                     wrappers=tuple(wrappers), mesh_shape=shape, mesh_dim_names=names,
                     group=dist.group.WORLD)


class FlatSegment:
    """One original parameter's part of this rank's shard of an FSDP1 ``FlatParameter``: a
    stand-in for the parameter wherever gradscope takes norms (it is not an ``nn.Parameter``)."""

    __slots__ = ("flat", "offset", "length", "full")

    def __init__(self, flat: Tensor, offset: int, length: int, full: int) -> None:
        self.flat, self.offset, self.length, self.full = flat, offset, length, full

    def numel(self) -> int:
        """The original parameter's size (for the layer table), not this rank's part of it."""
        return self.full

    @property
    def grad(self) -> Tensor | None:
        g = self.flat.grad
        return None if g is None else g[self.offset:self.offset + self.length]

    def local(self) -> Tensor:
        return self.flat.detach()[self.offset:self.offset + self.length]


def fsdp1_segments(model: nn.Module) -> tuple[dict[int, list[FlatSegment]], set[int], dict[int, int]]:
    """For the FSDP1 wrappers in ``model``: {id(module): its parameters' segments} and the ids of
    the flat parameters they replace (``use_orig_params=False``), and {id(parameter): its full
    size} of the original parameters that hold only this rank's part (``use_orig_params=True``)."""
    fsdp1 = _fsdp1_class()
    segments: dict[int, list[FlatSegment]] = {}
    hidden: set[int] = set()
    sizes: dict[int, int] = {}
    if fsdp1 is None:
        return segments, hidden, sizes
    for m in model.modules():
        handle = getattr(m, "_handle", None) if isinstance(m, fsdp1) else None
        flat = getattr(handle, "flat_param", None)
        if flat is None:
            continue
        if getattr(handle, "_use_orig_params", False):
            sizes.update((id(p), numel) for p, numel in zip(flat._params or [], flat._numels))
            continue
        hidden.add(id(flat))
        for info, shard, numel in zip(flat._param_infos, flat._shard_param_infos, flat._numels):
            offset, length = (shard.offset_in_shard, shard.numel_in_shard) if shard.in_shard else (0, 0)
            segments.setdefault(id(info.module), []).append(FlatSegment(flat, offset, length, numel))
    return segments, hidden, sizes


class Holding:
    """The part of each parameter this process holds, and whether its squared norm counts here."""

    def __init__(self, model: nn.Module, processes: Processes) -> None:
        self.model, self.rank, self.several = model, processes.rank, processes.several
        self.refresh()

    def refresh(self) -> None:
        """Look the wrappers up again (``fully_shard`` after ``watch()`` may import DTensor only then)."""
        self._dtensor = _dtensor_class()
        self._fsdp1_sharded = _fsdp1_sharded(self.model) if self.several else {}

    def counts(self, p: Tensor) -> bool:
        """Whether ``p``'s local squared norm is part of the sum over ranks (see the module docstring)."""
        if not self.several:
            return True
        if self._dtensor is not None and isinstance(p, self._dtensor):
            coordinate = p.device_mesh.get_coordinate()
            if coordinate is None:  # this rank is not in the parameter's mesh
                return False
            return all(c == 0 for c, placement in zip(coordinate, p.placements) if not _sharded(placement))
        if isinstance(p, FlatSegment):
            p = p.flat
        if id(p) in self._fsdp1_sharded:  # an FSDP1 flat shard (or a view of one): this rank's replica group
            return self._fsdp1_sharded[id(p)]
        return self.rank == 0  # replicated (DDP, or a module no wrapper shards)

    def is_plain(self, params: list[Any]) -> bool:
        """Whether every parameter is its own local tensor (no DTensor, no segment): the fast path."""
        dtensor = self._dtensor
        return not any(isinstance(p, FlatSegment) or (dtensor is not None and isinstance(p, dtensor)) for p in params)

    def local(self, p: Any) -> Tensor:
        if isinstance(p, FlatSegment):
            return p.local()
        return p.to_local() if self._dtensor is not None and isinstance(p, self._dtensor) else p

    def local_grad(self, p: Tensor) -> Tensor | None:
        g = p.grad
        if g is not None and self._dtensor is not None and isinstance(g, self._dtensor):
            return g.to_local()
        return g


def _sharded(placement: Any) -> bool:
    return not (placement.is_replicate() or placement.is_partial())


def _fsdp1_sharded(model: nn.Module) -> dict[int, bool]:
    """id -> counts-here of every parameter that FSDP1 shards: its flat parameters and, with
    ``use_orig_params=True``, the original parameters (views of this rank's flat shard)."""
    fsdp1 = _fsdp1_class()
    if fsdp1 is None:
        return {}
    import torch.distributed as dist
    from torch.distributed.fsdp import ShardingStrategy

    out: dict[int, bool] = {}
    for m in model.modules():
        if not isinstance(m, fsdp1):
            continue
        handle = getattr(m, "_handle", None)
        flat = getattr(handle, "flat_param", None)
        if flat is None:
            continue
        strategy = getattr(m, "sharding_strategy", ShardingStrategy.FULL_SHARD)
        if strategy == ShardingStrategy.NO_SHARD:
            here = dist.get_rank() == 0
        elif strategy in (ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2):
            inter = getattr(m, "_inter_node_pg", None)
            here = inter is None or dist.get_rank(inter) == 0
        else:
            here = True
        for p in [flat, *(getattr(flat, "_params", None) or [])]:
            out[id(p)] = here
    return out


def _dtensor_class() -> type | None:
    return _loaded("torch.distributed.tensor", "DTensor")


def _fsdp2_module_class() -> type | None:
    return _loaded("torch.distributed.fsdp", "FSDPModule")


def _fsdp1_class() -> type | None:
    return _loaded("torch.distributed.fsdp", "FullyShardedDataParallel")


def _loaded(module: str, name: str) -> type | None:
    """A wrapper class if its module is imported already, else None: a model can only hold what
    the program imported, and importing FSDP to find out costs over a second."""
    found = sys.modules.get(module)
    return getattr(found, name, None) if found is not None else None
