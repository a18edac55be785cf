"""Blocks: units that could carry a residual connection, H(x) = F(x) + x.

A block's input and output have the same shape, so how close it is to the identity can be
measured. Reference models declare their blocks and residual branches (``gradscope_blocks()``),
and a plain twin declares the same block names as its residual twin so the two line up.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class BlockSpec:
    """One declared block: its qualified name, its residual branch F if known, and whether it adds x."""

    name: str
    branch: str | None = None  # qualified name of the module computing F(x); None if unknown
    residual: bool = True  # False for a plain twin's block (same boundaries, no skip)


def declared_blocks(model: nn.Module) -> list[BlockSpec] | None:
    """Blocks a model declares through ``gradscope_blocks()``, or None if it declares none."""
    declare = getattr(model, "gradscope_blocks", None)
    if declare is None or not callable(declare):
        return None
    return list(declare())
