"""Blocks: units that could carry a residual connection, H(x) = F(x) + x, and how close to the
identity they are (DESIGN.md Blocks and the per-block Metrics).

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

import torch
from torch import Tensor, nn

from gradscope.layers import ModuleFilter, as_predicate
from gradscope.stats import Scratch

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
    """Blocks a model declares through ``gradscope_blocks()``, or None if it declares none."""
    declare = getattr(model, "gradscope_blocks", None)
    if declare is None or not callable(declare):
        return None
    return list(declare())


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
        classes = Counter(type(child) for _, child in children)
        for child_name, child in children:
            if classes[type(child)] > 1 and next(child.children(), None) is not None:
                found.append(f"{name}.{child_name}" if name else child_name)
    return found


def select_blocks(model: nn.Module, blocks: ModuleFilter | None) -> list[tuple[Block, nn.Module, nn.Module | None]]:
    """Watched blocks with their modules and branch modules, in registration order.

    ``blocks=None`` takes the model's declaration, else discovery; a filter picks modules
    itself (declared branches are still used for the modules it picks).
    """
    modules = dict(model.named_modules())
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
        block = Block(name=name, type=type(modules[name]).__name__, row=row,
                      source="declared" if spec and source != "selected" else source,
                      branch=spec.branch if spec else None, residual=spec.residual if spec else None)
        out.append((block, modules[name], branch))
    return out


def sample_squares(x: Tensor, y: Tensor, scratch: Scratch | None = None) -> Tensor:
    """[3, samples] float32: ||y_i - x_i||^2, ||x_i||^2 and ||y_i||^2 for each sample (leading dim).

    ``y - x`` is formed explicitly, so an exact identity gives exactly 0. On CUDA the three
    reductions are one kernel over a stacked copy (launches cost more than bytes there; with
    Triton, ``kernels.sample_squares`` reads x and y once instead); on the CPU three separate
    reductions avoid the copy, and ``y - x`` goes into ``scratch`` if given.
    """
    n = x.shape[0] if x.dim() > 0 else 1
    x2, y2 = x.reshape(n, -1), y.reshape(n, -1)
    if x2.dtype != torch.float32 or y2.dtype != torch.float32:
        x2, y2 = x2.float(), y2.float()
    if x2.is_cuda:
        return torch.linalg.vector_norm(torch.stack([y2 - x2, x2, y2]), dim=-1).square_()
    diff = y2 - x2 if scratch is None else torch.sub(y2, x2, out=scratch.take(y2.numel(), y2).view(y2.shape))
    return torch.stack([torch.linalg.vector_norm(diff, dim=1), torch.linalg.vector_norm(x2, dim=1),
                        torch.linalg.vector_norm(y2, dim=1)]).square_()


def identity_terms(squares: Tensor) -> Tensor:
    """[samples, 3] float32 from ``sample_squares`` (of any number of blocks, concatenated):
    ||y - x||^2, ||x||^2 and cos(x, y) per sample, to be summed into the block buffer.

    The cosine needs no extra pass: x.y = (|x|^2 + |y|^2 - |y - x|^2) / 2.
    """
    sq = squares
    cos = (sq[1] + sq[2] - sq[0]) / (2 * sq[1].sqrt() * sq[2].sqrt()).clamp_min(1e-30)
    return torch.stack([sq[0], sq[1], cos.clamp(-1, 1)], dim=1)


def token_direction_sums(y: Tensor) -> Tensor:
    """[batch, dim] float32 sum_i u_i for ``y`` [batch, tokens, dim], with u_i the tokens' unit
    vectors: the part of ``token_cosines`` that needs ``y``.

    sum_i u_i is a weighted sum of the rows of ``y`` (weights 1/||y_i||), one batched matmul,
    so no normalised copy of ``y`` is made. Four kernels per call (on a GPU with Triton one, which
    gives ``sample_squares`` too: ``kernels.block_sums``); the norms and the rest of the formula
    run once per step for every block (``token_direction_norms``, ``token_cosines``), launches
    being what a GPU step pays for.
    """
    yf = y if y.dtype == torch.float32 else y.float()
    inverse = torch.linalg.vector_norm(yf, dim=-1).clamp_min_(1e-12).reciprocal_()  # [batch, tokens]
    # under autocast bmm would round to bfloat16/float16 (and hand the buffer a narrower dtype)
    with torch.autocast(y.device.type, enabled=False):
        return torch.bmm(inverse.unsqueeze(1), yf).squeeze(1)


def token_direction_norms(sums: list[Tensor]) -> Tensor:
    """||sum_i u_i|| of every sample of several ``token_direction_sums`` results, concatenated
    (one kernel for all when they share a width)."""
    if len({z.shape[-1] for z in sums}) == 1:
        return torch.linalg.vector_norm(torch.cat(sums) if len(sums) > 1 else sums[0], dim=-1)
    return torch.cat([torch.linalg.vector_norm(z, dim=-1) for z in sums])


def token_cosines(norms: Tensor, tokens: float | Tensor) -> Tensor:
    """Mean pairwise cosine between the tokens of each sample, from ``token_direction_norms``.

    With unit vectors u_i, the mean over pairs i != j of u_i . u_j is
    (||sum_i u_i||^2 - T) / (T (T - 1)); near 1 means the tokens collapsed to one direction.
    ``tokens`` is T, a number or a tensor with one per sample.
    """
    return (norms.square() - tokens) / (tokens * (tokens - 1))
