"""The layer table: which modules are watched, their names, and their order of execution.

Records are keyed by the qualified name from ``named_modules()`` (as TransformerLens does), and
layers are ordered by first execution rather than registration, because registration order says
nothing about where a module sits in the computation (shared or reused modules, ModuleDicts).
``rel_depth = depth / (n - 1)`` lets networks of different depth line up in reports.

By default every parameter of the model is in exactly one row: a leaf module's (a parametrized
one's originals included), or else a row of its own named after the parameter (type
``Parameter``, norms only: a top-level ``pos_embed``, ``nn.MultiheadAttention.in_proj_weight``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from gradscope.recording.processes import user_class, user_name
from gradscope.store.meta import PARAMETER_TYPE

#: What ``watch(modules=...)`` accepts: a glob on qualified names, a module type, a predicate
#: ``(name, module) -> bool``, or a list of those (a module matching any of them is watched).
ModuleFilter = str | type | Callable[[str, nn.Module], bool] | Iterable[Any]


@dataclass
class Layer:
    """One watched module: a row of the layer table in ``meta.json``."""

    name: str
    type: str
    params: int  # number of elements in the module's *own* parameters (not its children's)
    row: int  # index in the recorder's device buffer (registration order)
    depth: int | None = None  # index in order of first execution; None if it never ran
    rel_depth: float | None = None
    calls: int = 0  # most forward calls seen in one recorded step
    saturation_bounds: tuple[float, float] | None = None
    zero_counted: bool = False  # act_zero_frac is measured (ReLU-like outputs; NaN elsewhere)

    def to_json(self) -> dict[str, Any]:
        # a shallow copy: every field is a scalar or a tuple (asdict's deep copy cost 10x more,
        # and meta.json is rewritten for every layer at each flush)
        d = dict(vars(self))
        d["saturation_bounds"] = list(self.saturation_bounds) if self.saturation_bounds else None
        return d


def saturation_range(module: nn.Module) -> tuple[float, float] | None:
    """(low, high) bounds of a bounded activation's output, or None for any other module."""
    if isinstance(module, nn.Sigmoid):
        return (0.0, 1.0)
    if isinstance(module, nn.Tanh):
        return (-1.0, 1.0)
    if isinstance(module, nn.Hardtanh):  # includes ReLU6
        return (float(module.min_val), float(module.max_val))
    return None


#: Modules whose outputs are exactly zero where a unit is off, so the zero fraction means dead units.
ZERO_MEANINGFUL = (nn.ReLU, nn.ReLU6, nn.Threshold, nn.Hardshrink, nn.Softshrink)


def counts_zeros(module: nn.Module) -> bool:
    """Whether ``act_zero_frac`` is measured for ``module`` (a pre-activation's is noise, and costs a pass)."""
    return isinstance(module, ZERO_MEANINGFUL) or (isinstance(module, nn.Hardtanh) and module.min_val == 0)


class ParameterRow:
    """Parameters that no watched module owns (a model's own ``pos_embed``, a container's, the
    ``in_proj_weight`` of ``nn.MultiheadAttention``): a layer row of norms only, no probe."""

    __slots__ = ("params",)

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params


def parametrizations(module: nn.Module) -> nn.Module | None:
    """The container of a module's parametrized tensors (weight_norm, spectral_norm), or None."""
    return module.parametrizations if parametrize.is_parametrized(module) else None  # type: ignore[return-value]


def own_parameters(module: nn.Module | ParameterRow) -> list[nn.Parameter]:
    """A module's own parameters, not its children's, but with the originals of its parametrized
    tensors: ``fc1.weight`` under weight_norm lives in ``fc1.parametrizations.weight.original0/1``."""
    if isinstance(module, ParameterRow):
        return list(module.params)
    params = list(module.parameters(recurse=False))
    inner = parametrizations(module)
    if inner is not None:
        params += [p for p in inner.parameters() if all(p is not q for q in params)]
    return params


class Ownership:
    """Which parameters each module owns: its own (``own_parameters``), except that FSDP1
    without ``use_orig_params`` replaces the wrapped modules' parameters by one flat parameter
    (``hidden``), whose segments (``processes.FlatSegment``) are given back to their modules;
    with it, the parameters hold only this rank's part (``sizes``: the full ones)."""

    def __init__(self, segments: dict[int, list[Any]] | None = None, hidden: set[int] | None = None,
                 sizes: dict[int, int] | None = None) -> None:
        self.segments, self.hidden, self.sizes = segments or {}, hidden or set(), sizes or {}

    def numel(self, p: Any) -> int:
        """A parameter's full size, whatever part of it this rank holds."""
        return self.sizes.get(id(p), p.numel())

    def own(self, module: nn.Module | ParameterRow) -> list[Any]:
        params = own_parameters(module)
        if not self.hidden or isinstance(module, ParameterRow):
            return params
        return [p for p in params if id(p) not in self.hidden] + self.segments.get(id(module), [])

    def parameters(self, model: nn.Module) -> list[Any]:
        """Every parameter of ``model`` once, flat ones replaced by their segments."""
        params = [p for p in model.parameters() if id(p) not in self.hidden]
        return params + [segment for segments in self.segments.values() for segment in segments]


def is_leaf(module: nn.Module) -> bool:
    """No children, or none but its parametrizations container (a parametrized ``nn.Linear``)."""
    inner = parametrizations(module)
    return all(child is inner for child in module.children())


#: Parameter-free activation modules, watched on request (dead ReLUs, saturated sigmoids).
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.ELU)


def default_filter(name: str, module: nn.Module) -> bool:
    """Leaf modules that own parameters: the layers whose gradients a user can act on."""
    return is_leaf(module) and bool(own_parameters(module))


def with_activations(name: str, module: nn.Module) -> bool:
    """The default layers plus activation modules, whose outputs show dead or saturated units."""
    return default_filter(name, module) or isinstance(module, ACTIVATIONS)


def as_predicate(spec: ModuleFilter) -> Callable[[str, nn.Module], bool]:
    if isinstance(spec, str):
        return lambda name, _m: fnmatch.fnmatchcase(name, spec)
    if isinstance(spec, type):
        if not issubclass(spec, nn.Module):
            raise TypeError(f"modules=: {spec.__name__} is not an nn.Module subclass")
        return lambda _n, m: isinstance(m, spec)
    if callable(spec):
        return spec
    try:
        parts = [as_predicate(s) for s in spec]
    except TypeError:
        raise TypeError(
            f"modules= takes a glob string, an nn.Module type, a predicate (name, module) -> bool, "
            f"or a list of those; got {type(spec).__name__}"
        ) from None
    return lambda name, m: any(p(name, m) for p in parts)


#: Filters that mean "every layer": under them, parameters no watched module owns get rows of
#: their own, so that the layer table covers every parameter of the model.
COVERING_FILTERS = (default_filter, with_activations)


def select_layers(model: nn.Module, modules: ModuleFilter | None = None, ownership: Ownership | None = None,
                  ) -> list[tuple[Layer, nn.Module | ParameterRow]]:
    """Watched modules of ``model`` in registration order, each with its layer-table row, then
    (under a covering filter) a ``ParameterRow`` for each parameter that none of them owns.

    The modules inside a parametrization (``fc1.parametrizations.weight.0``) are never rows:
    their parameters are ``fc1``'s.
    """
    keep = default_filter if modules is None else as_predicate(modules)
    covering = modules is None or any(modules is f for f in COVERING_FILTERS)
    ownership = ownership or Ownership()
    own = ownership.own
    if ownership.hidden and covering:  # leaves whose parameters FSDP1 flattened still own them
        keep = (lambda spec: lambda name, m: spec(name, m) or (is_leaf(m) and bool(own(m))))(keep)
    internal = _parametrization_internals(model)
    chosen: list[tuple[str, nn.Module | ParameterRow]] = [
        (user_name(name), m) for name, m in model.named_modules() if id(m) not in internal and keep(user_name(name), m)]
    if covering:
        covered = {id(p) for _, m in chosen for p in own(m)} | ownership.hidden
        chosen += [(user_name(name), ParameterRow(params))
                   for name, params in _unowned_parameters(model, internal, covered)]
    if not chosen:
        what = "it has no parameters" if modules is None else f"modules={modules!r} matched no module"
        raise ValueError(f"gradscope.watch: nothing to watch in {type(model).__name__}: {what}")
    return [
        (
            Layer(
                name=name,
                type=PARAMETER_TYPE if isinstance(m, ParameterRow) else _type_name(m),
                params=sum(ownership.numel(p) for p in own(m)),
                row=row,
                saturation_bounds=None if isinstance(m, ParameterRow) else saturation_range(m),
                zero_counted=False if isinstance(m, ParameterRow) else counts_zeros(m),
            ),
            m,
        )
        for row, (name, m) in enumerate(chosen)
    ]


def _type_name(module: nn.Module) -> str:
    """The class name a user wrote: a parametrized ``nn.Linear``'s class is ``ParametrizedLinear``,
    a ``fully_shard``-ed one's ``FSDPLinear``."""
    cls = user_class(module)
    if parametrizations(module) is not None and cls.__name__.startswith("Parametrized") and cls.__bases__:
        cls = cls.__bases__[0]
    return cls.__name__


def _parametrization_internals(model: nn.Module) -> set[int]:
    """ids of every module inside a parametrized module's ``parametrizations`` container."""
    inside: set[int] = set()
    for m in model.modules():
        inner = parametrizations(m)
        if inner is not None:
            inside.update(id(sub) for sub in inner.modules())
    return inside


def _unowned_parameters(model: nn.Module, internal: set[int], covered: set[int],
                        ) -> list[tuple[str, list[nn.Parameter]]]:
    """(qualified name, parameters) of each parameter outside ``covered``, once: a plain one
    alone, a parametrized tensor's originals together under the tensor's name (``blk.weight``)."""
    seen, out = set(covered), []
    for name, m in model.named_modules():
        if id(m) in internal:
            continue
        prefix = f"{name}." if name else ""
        groups = [(prefix + pname, [p]) for pname, p in m.named_parameters(recurse=False)]
        inner = parametrizations(m)
        if inner is not None:
            groups += [(prefix + tname, list(plist.parameters())) for tname, plist in inner.named_children()]
        for qualified, params in groups:
            new = [p for p in params if id(p) not in seen]
            if new:
                seen.update(id(p) for p in new)
                out.append((qualified, new))
    return out


class ExecutionOrder:
    """Rows of a table (layers or blocks) in order of first execution; gives them their depth."""

    __slots__ = ("rows", "_seen")

    def __init__(self, n: int) -> None:
        self.rows: list[int] = []
        self._seen = [False] * n

    def note(self, row: int) -> None:
        """Row ``row`` ran (called from every recorded forward hook: a list lookup when seen)."""
        if not self._seen[row]:
            self._seen[row] = True
            self.rows.append(row)

    def assign_depths(self, entries: list[Any]) -> None:
        """Set ``depth``/``rel_depth`` of the table's entries (layers or blocks) from this order."""
        n = len(self.rows)
        for depth, row in enumerate(self.rows):
            entries[row].depth = depth
            entries[row].rel_depth = depth / (n - 1) if n > 1 else 0.0
