"""Blocks: units that could carry a residual connection, H(x) = F(x) + x, and how close to the
identity they are (docs/design.md, "Blocks" and "Metrics").

A block's input and output have the same shape, so it can be compared with the identity in the
forward direction (``||y - x|| / ||x||``, per-sample cosine) and in the backward direction
(``||dL/dx|| / ||dL/dy||``, about 1 for a residual block, He et al. 2016). Reference models
declare their blocks and residual branches (``gradscope_blocks()``); a plain twin declares the
same names as its residual twin so the two line up. Other models are searched: a block is a
non-leaf module with a sibling of the same class in an ``nn.Sequential`` or ``nn.ModuleList``
(``BasicBlock`` in ``layer1``, ``GPT2Block`` in ``transformer.h``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from torch import nn

from gradscope.recording.layers import ModuleFilter, as_predicate
from gradscope.recording.processes import inner_module, modules_by_user_name, user_class, user_name


@dataclass(frozen=True)
class BlockSpec:
    """One declared block: its qualified name, its residual branch F if known, and whether it adds x."""

    name: str
    branch: str | None = None  # qualified name of the module computing F(x); None if unknown
    residual: bool = True  # False for a plain twin's block (same boundaries, no skip)
    shortcut: str | None = None  # module computing the skip term, where it is not the identity on x


@dataclass
class Block:
    """A watched block: a row of the block table in ``meta.json``."""

    name: str
    type: str
    row: int
    source: str  # "declared" (reference model), "discovered", or "selected" (watch(blocks=...))
    branch: str | None = None
    residual: bool | None = None  # None where the model does not say
    depth: int | None = None  # order of first execution among blocks
    rel_depth: float | None = None
    calls: int = 0
    reason: str | None = None  # why identity metrics are NaN (the block changes shape)

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))  # a shallow copy: every field is a scalar (see Layer.to_json)


def declared_blocks(model: nn.Module) -> list[BlockSpec] | None:
    """Blocks a model declares through ``gradscope_blocks()``, or None if it declares none.

    Names are taken as the user's: a declaration built from ``named_modules()`` after a block was
    wrapped (``torch.compile`` of one layer, FSDP1) carries the wrapper's segments (``_orig_mod``).
    """
    declare = getattr(model, "gradscope_blocks", None)
    if declare is None or not callable(declare):
        return None

    def named(name: str | None) -> str | None:
        return None if name is None else user_name(name)

    return [BlockSpec(user_name(s.name), named(getattr(s, "branch", None)), getattr(s, "residual", True),
                      named(getattr(s, "shortcut", None))) for s in declare()]  # (or any object with these)


def discover_blocks(model: nn.Module) -> list[str]:
    """Qualified names of modules that look like repeated blocks (see the module docstring).

    The same-shape condition is checked when the block runs: one that changes shape is kept
    in the table with the reason, so a stage's downsampling block still shows up.
    """
    found = []
    for name, container in model.named_modules():
        if not isinstance(container, (nn.Sequential, nn.ModuleList)):
            continue
        children = list(container.named_children())
        classes = Counter(user_class(child) for _, child in children)
        for child_name, child in children:
            if classes[user_class(child)] > 1 and next(inner_module(child).children(), None) is not None:
                found.append(user_name(f"{name}.{child_name}" if name else child_name))
    return list(dict.fromkeys(found))


def select_blocks(model: nn.Module, blocks: ModuleFilter | None) -> list[tuple[Block, nn.Module, nn.Module | None]]:
    """Watched blocks with their modules and branch modules, in registration order.

    ``blocks=None`` takes the model's declaration, else discovery; a filter picks modules
    itself (declared branches are still used for the modules it picks).
    """
    modules = modules_by_user_name(model)  # (FSDP1's and compile's wrappers: the wrapped module)
    declared = {spec.name: spec for spec in declared_blocks(model) or []}
    if blocks is not None:
        keep = as_predicate(blocks)
        names, source = [n for n, m in modules.items() if keep(n, m)], "selected"
    elif declared:
        names, source = list(declared), "declared"
    else:
        names, source = discover_blocks(model), "discovered"
    out = []
    for row, name in enumerate(names):
        if name not in modules:
            raise ValueError(f"{type(model).__name__} declares block {name!r}, which is not one of its modules")
        spec = declared.get(name)
        branch = modules.get(spec.branch) if spec and spec.branch else None
        block = Block(name=name, type=user_class(modules[name]).__name__, row=row,
                      source="declared" if spec and source != "selected" else source,
                      branch=spec.branch if spec else None, residual=spec.residual if spec else None)
        out.append((block, modules[name], branch))
    return out
