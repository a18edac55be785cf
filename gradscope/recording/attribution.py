"""Attribution flow at checkpoints, computed with Captum's layer methods on a fixed probe batch.

Gradient norms say how much signal reaches a block; attribution says how much the block's
output contributes to the model's output. At every ``every``-th step the recorder runs the
probe batch through the model *outside* the training step: in eval mode (BatchNorm uses its
running statistics, dropout is off, no buffer changes), under its own autograd graph, with the
CPU random state forked, then puts every module's mode back. Captum computes gradients with
``torch.autograd.grad``, so no parameter's ``.grad`` is touched; its hooks are removed in its
own ``finally``.

Target score per probe sample: the logit of its label (``y``), averaged over scored positions
(targets != -100) for sequence outputs; the model's own prediction where ``y`` is None.

Per block and checkpoint (means over probe samples; each sample's attribution summed over units):

- ``attr_sum``, ``attr_abs``: attribution of the block's output, signed and in absolute value,
  with the chosen method: ``"grad_x_act"`` (``LayerGradientXActivation``, all blocks in one
  pass), ``"integrated_gradients"`` (``LayerIntegratedGradients``, one pass per block, input
  baseline zeros / token 0) or ``"conductance"`` (``LayerConductance``, one pass per block,
  floating-point inputs only).
- ``branch_attr``, ``skip_attr``: first-order split at the addition s = F(x) + skip(x) of a
  block with a known branch F: ``sum(dS/ds * F(x))`` and ``sum(dS/ds * skip(x))``. dS/ds is
  Captum's layer gradient at F's output (the addition passes it unchanged); skip(x) is the
  output of a declared shortcut module, else the block's input. A plain twin (no skip) has
  ``skip_attr`` 0.
- ``branch_share``, ``skip_share``: how the absolute attribution at the addition divides between
  the two paths, ``sum|dS/ds * F| / (sum|dS/ds * F| + sum|dS/ds * skip|)`` (over units, mean over
  samples) and its complement. Absolute values per unit, because signed sums cancel: just
  before a LayerNorm (Post-LN) dS/ds is orthogonal to s, so ``branch_attr = -skip_attr``
  exactly. A skip share of 1 means the branch adds nothing the output depends on.

Everything stays on the device; the recorder copies it at its next flush.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradscope.recording.blocks import Block, declared_blocks
from gradscope.recording.probe_state import probe_state
from gradscope.recording.processes import modules_by_user_name
from gradscope.store.schema import columns

METHODS = ("grad_x_act", "integrated_gradients", "conductance")
COLUMNS = tuple(c.name for c in columns("attribution"))  # declared in store.schema
IGNORE = -100  # targets that are not scored (F.cross_entropy's ignore_index)


@dataclass(frozen=True)
class Attribution:
    """What to attribute, how often and how: pass as ``watch(..., attribution=Attribution(...))``.

    Args:
        probe_batch: ``(x, y)``, ``x`` a tensor or a tuple of the model's positional inputs,
            ``y`` the labels (or token targets with -100 for unscored positions), or None to
            attribute the model's own prediction. Kept on the model's device.
        every: attribute at steps 0, every, 2*every, ... (parameters as the step begins).
        method: ``"grad_x_act"``, ``"integrated_gradients"`` or ``"conductance"``.
        blocks: names or glob patterns among the watched blocks (default: all of them);
            the path-integral methods cost one Captum pass per block, so pick a few.
        n_steps: integration steps of the path-integral methods.
    """

    probe_batch: tuple[Any, Tensor | None]
    every: int = 100
    method: str = "grad_x_act"
    blocks: Sequence[str] | None = None
    n_steps: int = 20

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"attribution method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name, value in (("every", self.every), ("n_steps", self.n_steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Attribution: {name} must be a positive integer, got {value!r}")
        if not (isinstance(self.probe_batch, tuple) and len(self.probe_batch) == 2):
            raise ValueError("Attribution: probe_batch must be a pair (x, y); y may be None")
        if isinstance(self.blocks, str):
            object.__setattr__(self, "blocks", (self.blocks,))

    def describe(self) -> dict[str, Any]:
        """What meta.json records about the checkpoints."""
        x, y = self.probe_batch
        return {"method": self.method, "every": self.every, "probe_size": int(_inputs(x)[0].shape[0]),
                "target": "label" if y is not None else "prediction",
                "n_steps": self.n_steps if self.method != "grad_x_act" else None}


@dataclass
class _Unit:
    """One attributed block and the modules its split needs."""

    row: int  # row among the attributed blocks (the attribution table's order)
    block: Block
    module: nn.Module
    branch: nn.Module | None
    shortcut: nn.Module | None


class AttributionProbe:
    """Runs one configured attribution checkpoint; owned by a ``Recorder``."""

    def __init__(self, config: Attribution, model: nn.Module, blocks: list[tuple[Block, nn.Module, nn.Module | None]],
                 device: torch.device) -> None:
        self.config, self.model = config, model
        chosen = [(b, m, br) for b, m, br in blocks if _wanted(b.name, config.blocks)]
        if not chosen:
            what = f"matching {list(config.blocks)}" if config.blocks else "to attribute"
            raise ValueError(f"gradscope attribution: no watched block {what}; the watched blocks are "
                             f"{[b.name for b, _, _ in blocks] or 'none (pass blocks= to watch())'}")
        modules = modules_by_user_name(model)  # as declared_blocks names them
        shortcuts = {s.name: modules.get(s.shortcut) for s in declared_blocks(model) or [] if s.shortcut}
        self.units = [_Unit(i, b, m, br, shortcuts.get(b.name)) for i, (b, m, br) in enumerate(chosen)]
        self.names = [u.block.name for u in self.units]
        x, y = config.probe_batch
        self.inputs = tuple(t.to(device) for t in _inputs(x))
        self.targets = y.to(device) if y is not None else None
        if config.method == "conductance" and not all(t.is_floating_point() for t in self.inputs):
            raise ValueError("gradscope attribution: 'conductance' interpolates the model's inputs and needs "
                             "floating-point inputs; use 'integrated_gradients' (it interpolates at the layer) "
                             "for token inputs")
        self.baselines = tuple(torch.zeros_like(t) for t in self.inputs)

    def __call__(self) -> Tensor:
        """``[blocks, len(COLUMNS)]`` float32 on the device, for the model as it is now."""
        with probe_state(self.model):
            targets = self.targets
            if targets is None:
                with torch.no_grad():
                    targets = _predicted(self.model(*self.inputs))
            score = _score_fn(self.model, targets)
            attrs = self._block_attributions(score)
            split = self._branch_split(score)
        return torch.cat([attrs, split], dim=1).detach()

    def _block_attributions(self, score: Callable[..., Tensor]) -> Tensor:
        modules = [u.module for u in self.units]
        method, inputs = self.config.method, self.inputs
        if method == "grad_x_act":
            from captum.attr import LayerGradientXActivation
            per_block = _as_list(LayerGradientXActivation(score, modules).attribute(inputs))
        elif method == "integrated_gradients":
            from captum.attr import LayerIntegratedGradients
            per_block = [LayerIntegratedGradients(score, m).attribute(
                inputs, baselines=self.baselines, n_steps=self.config.n_steps) for m in modules]
        else:
            from captum.attr import LayerConductance
            # Captum's conductance sums gradient x activation change between consecutive path
            # points; trapezoid points include both ends, so it adds up to the layer's whole change
            per_block = [LayerConductance(score, m).attribute(
                inputs, baselines=self.baselines, n_steps=self.config.n_steps, method="riemann_trapezoid")
                for m in modules]
        rows = []
        for attr in per_block:
            a = _per_sample(attr)
            rows.append(torch.stack([a.sum(1).mean(), a.abs().sum(1).mean()]))
        return torch.stack(rows)

    def _branch_split(self, score: Callable[..., Tensor]) -> Tensor:
        rows = torch.full((len(self.units), 4), float("nan"), device=self.inputs[0].device)  # NaN: no split
        split = [u for u in self.units if u.branch is not None]
        if not split:
            return rows
        from captum.attr import LayerActivation, LayerGradientXActivation
        branches = [u.branch for u in split]
        grads = _as_list(LayerGradientXActivation(score, branches, multiply_by_inputs=False).attribute(self.inputs))
        outputs = _as_list(LayerActivation(score, branches).attribute(self.inputs))
        with_module = [u for u in split if u.block.residual is not False and u.shortcut is not None]
        from_input = [u for u in split if u.block.residual is not False and u.shortcut is None]
        skips: dict[int, Tensor] = {}
        if with_module:
            found = _as_list(LayerActivation(score, [u.shortcut for u in with_module]).attribute(self.inputs))
            skips.update({u.row: t for u, t in zip(with_module, found)})
        if from_input:
            found = _as_list(LayerActivation(score, [u.module for u in from_input]).attribute(
                self.inputs, attribute_to_layer_input=True))
            skips.update({u.row: t for u, t in zip(from_input, found)})
        for u, grad, out in zip(split, grads, outputs):
            g = _per_sample(grad)
            branch = g * _per_sample(out)  # [samples, units]
            skip = _first(skips[u.row]) if u.row in skips else None
            if skip is None:  # a plain twin: everything goes through the branch
                skip_part = torch.zeros_like(branch)
            elif skip.numel() == g.numel():
                skip_part = g * skip.reshape(g.shape)
            else:  # the skip's shape does not match the branch's: no split to report
                continue
            b_abs, s_abs = branch.abs().sum(1).mean(), skip_part.abs().sum(1).mean()
            share = b_abs / (b_abs + s_abs)
            rows[u.row] = torch.stack([branch.sum(1).mean(), skip_part.sum(1).mean(), share, 1 - share])
        return rows


def _score_fn(model: nn.Module, targets: Tensor) -> Callable[..., Tensor]:
    """Forward function for Captum: one target score per probe sample."""

    def score(*inputs: Tensor) -> Tensor:
        out = model(*inputs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        t = targets
        if out.shape[0] != t.shape[0]:  # Captum's path-integral methods repeat the batch
            t = t.repeat(out.shape[0] // t.shape[0], *([1] * (t.dim() - 1)))
        picked = out.float().gather(-1, t.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        if picked.dim() == 1:
            return picked
        scored = (t != IGNORE).float()
        return (picked * scored).flatten(1).sum(1) / scored.flatten(1).sum(1).clamp_min(1)

    return score


def _predicted(out: Any) -> Tensor:
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.argmax(-1)


def _inputs(x: Any) -> tuple[Tensor, ...]:
    inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise ValueError("Attribution: probe_batch x must be a tensor or a tuple of tensors")
    return inputs


def _wanted(name: str, patterns: Sequence[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _as_list(result: Any) -> list[Any]:
    return list(result) if isinstance(result, list) else [result]


def _first(t: Any) -> Tensor:
    return t[0] if isinstance(t, tuple) else t


def _per_sample(t: Any) -> Tensor:
    """[samples, units] float32; a sequence-first output ([tokens, batch, ...]) is not expected."""
    t = _first(t)
    return t.float().reshape(t.shape[0], -1)
