"""Every recorded statistic, declared once (docs/design.md, "Schema").

A statistic is recorded in two stages, like torchmetrics' ``update()`` and ``compute()``:

- an **accumulator** is what the hot path writes on the device: one column of a statistics
  buffer, accumulated over a step's calls and merged with another partial accumulator (of another
  call, micro-batch or rank) by a declared rule;
- a **count** is what the host knows about a buffer cell without reading the device (elements
  seen, calls, which cells were written), kept in numpy, merged by addition or "any";
- a **column** is what a run stores: a Parquet column computed on the host, in float64, from the
  accumulators and counts of its table.

Buffer column indices (``LAYER.index["act_var"]``), the host counts, the finalisation and the
store's column lists and dtypes are all derived from the declarations below. Adding a statistic
means declaring it here, measuring it in the probe that sees its tensor, and testing it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Phases of a layer's rows: forwards with autograd on in train mode, and any other forward.
PHASES = ("train", "eval")
TRAIN, EVAL = 0, 1

#: Outputs within this fraction of a bounded activation's range from either bound count as saturated.
SATURATION_MARGIN = 0.01


class Merge(enum.Enum):
    """How two partial accumulators of one cell (two calls, micro-batches or ranks) combine."""

    SUM = "sum"
    MAX = "max"
    MIN = "min"
    #: count-weighted mean: (a n_a + b n_b) / (n_a + n_b), weights from the accumulator's count
    WEIGHTED = "weighted"
    #: count-weighted population variance with the spread of the two means (Chan et al.'s update):
    #: (a n_a + b n_b) / n + (mean_b - mean_a)^2 n_a n_b / n^2
    WEIGHTED_VARIANCE = "weighted_variance"


class Ranks(enum.Enum):
    """Which processes hold partial accumulators of one cell (docs/design.md, "Several processes")."""

    DATA = "data"  # each data-parallel rank saw part of the batch: merged over the data-parallel group
    #: a gradient of each rank's own loss: the ranks train on the mean of their losses (DDP and FSDP
    #: average gradients), so each rank's dL/dy is ``world`` times the objective's: merged, then / world^2.
    #: This takes every rank to be data-parallel with the default gradient divisor (not tensor
    #: parallelism, nor ``set_gradient_divide_factor``); a summed loss is scaled the same way.
    DATA_GRADIENT = "data, gradient"
    #: each rank holds a shard of the parameters: the squared norms of the shards that count on each
    #: rank (``recording.processes``) are added over all ranks
    SHARDS = "shards"


@dataclass(frozen=True)
class Accumulator:
    """One column of a device statistics buffer."""

    name: str
    table: str  # "layers", "blocks" or "scalars"
    merge: Merge
    count: str  # the host count (or written-flag) that says the cell holds a value (and weighs it)
    accumulates: str  # how the hot path accumulates it on the device
    meaning: str
    ranks: Ranks = Ranks.DATA
    mean: str | None = None  # WEIGHTED_VARIANCE: the accumulator holding the matching mean


@dataclass(frozen=True)
class Count:
    """What the host knows about each buffer cell, per slot; shaped by ``per``."""

    name: str
    per: str  # "phase_layer", "layer", "block", "step" or "step_stat"
    dtype: str  # "int64", "bool" or "float64"
    merge: Merge
    meaning: str
    #: how the ranks' counts combine, where not as the calls of one process do (calls per step
    #: are those of one process: each rank calls the module once on its share)
    over_ranks: Merge | None = None


@dataclass(frozen=True)
class Column:
    """One stored column: computed on the host from its table's accumulators and counts."""

    name: str
    table: str
    dtype: str  # Parquet/pandas dtype
    meaning: str
    finalize: Callable[[Finalizer], np.ndarray] | None = None  # None: computed elsewhere (attribution)


# ----------------------------------------------------------------------------------- counts

COUNTS: tuple[Count, ...] = (
    Count("act_n", "phase_layer", "int64", Merge.SUM, "output elements seen"),
    Count("act_calls", "phase_layer", "int64", Merge.SUM, "forward calls seen", over_ranks=Merge.MAX),
    Count("grad_n", "layer", "int64", Merge.SUM, "dL/dy elements seen"),
    Count("grad_calls", "layer", "int64", Merge.SUM, "dL/dy gradients seen", over_ranks=Merge.MAX),
    Count("param_rows", "layer", "bool", Merge.MAX, "parameter norms written"),
    Count("grad_rows", "layer", "bool", Merge.MAX, "parameter gradient norms written (some gradient present)"),
    Count("lr", "layer", "float64", Merge.MAX, "learning rate of the layer's parameters (NaN: unknown)"),
    Count("grads_scaled", "step", "bool", Merge.MAX, "parameter gradients still carried the AMP loss scale"),
    Count("step_set", "step_stat", "bool", Merge.SUM, "the step scalar was written"),
    Count("step_lr", "step", "float64", Merge.MAX, "learning rate of the first parameter group (NaN: unknown)"),
    Count("block_calls", "block", "int64", Merge.SUM, "block forward calls seen", over_ranks=Merge.MAX),
    Count("block_samples", "block", "int64", Merge.SUM, "samples compared with the identity (same-shape calls)"),
    Count("block_grad_in", "block", "int64", Merge.SUM, "dL/dx gradients seen"),
    Count("block_grad_out", "block", "int64", Merge.SUM, "dL/dy gradients seen"),
    Count("block_branch", "block", "int64", Merge.SUM, "residual-branch outputs F(x) seen"),
    Count("block_branch_dropped", "block", "bool", Merge.MAX, "a held F(x) was changed in place: branch_ratio lost"),
    Count("block_tokens", "block", "int64", Merge.SUM, "samples with a token cosine"),
    Count("micro_batches", "step", "int64", Merge.SUM, "backward passes whose gradient norm was taken "
          "(watch(noise_scale=True)), over every rank"),
    Count("micro_samples", "step", "int64", Merge.SUM, "samples in those backward passes' forwards"),
)
COUNT = {c.name: c for c in COUNTS}

# ----------------------------------------------------------------------------- accumulators

_FIRST_THEN_CHAN = "written by the first call of a step, later calls merged in (Chan)"

ACCUMULATORS: tuple[Accumulator, ...] = (
    # layers: [slots, phases, layers, columns]
    Accumulator("act_mean", "layers", Merge.WEIGHTED, "act_n", _FIRST_THEN_CHAN, "mean of the output y"),
    Accumulator("act_var", "layers", Merge.WEIGHTED_VARIANCE, "act_n", _FIRST_THEN_CHAN,
                "population variance of y", mean="act_mean"),
    Accumulator("act_absmax", "layers", Merge.MAX, "act_n", "max over calls", "max |y|"),
    Accumulator("act_nonzero", "layers", Merge.SUM, "act_n", "added per call (ReLU-like modules only)",
                "elements of y that are not 0"),
    Accumulator("act_saturated", "layers", Merge.SUM, "act_n", "added per call (bounded activations only)",
                "elements of y within SATURATION_MARGIN of the range from a bound"),
    Accumulator("grad_out_ss", "layers", Merge.SUM, "grad_n", "added per gradient hook", "||dL/dy||^2",
                ranks=Ranks.DATA_GRADIENT),
    Accumulator("param_ss", "layers", Merge.SUM, "param_rows", "written at the step's end (_foreach_norm)",
                "sum over the module's own parameters of ||p||^2", ranks=Ranks.SHARDS),
    Accumulator("grad_ss", "layers", Merge.SUM, "grad_rows", "written at the step's end (_foreach_norm)",
                "sum over the module's own parameters of ||p.grad||^2", ranks=Ranks.SHARDS),
    # blocks: [slots, blocks, columns]
    Accumulator("diff_ss", "blocks", Merge.SUM, "block_samples", "per-sample terms added at the step's end",
                "sum over calls and samples of ||y - x||^2"),
    Accumulator("input_ss", "blocks", Merge.SUM, "block_samples", "per-sample terms added at the step's end",
                "sum over calls and samples of ||x||^2"),
    Accumulator("cos_sum", "blocks", Merge.SUM, "block_samples", "per-sample terms added at the step's end",
                "sum over calls and samples of cos(x_i, y_i)"),
    Accumulator("grad_in_ss", "blocks", Merge.SUM, "block_grad_in", "added per gradient hook", "||dL/dx||^2",
                ranks=Ranks.DATA_GRADIENT),
    Accumulator("grad_out_ss", "blocks", Merge.SUM, "block_grad_out", "added per gradient hook", "||dL/dy||^2",
                ranks=Ranks.DATA_GRADIENT),
    Accumulator("branch_ss", "blocks", Merge.SUM, "block_branch", "added per branch call", "||F(x)||^2"),
    Accumulator("token_cos_sum", "blocks", Merge.SUM, "block_tokens", "per-sample terms added at the step's end",
                "sum over samples of the mean pairwise token cosine"),
    # scalars: [slots, columns]; a user's scalar is a mean over the ranks that wrote it
    Accumulator("loss", "scalars", Merge.WEIGHTED, "step_set", "written by step(loss=)", "training loss"),
    Accumulator("accuracy", "scalars", Merge.WEIGHTED, "step_set", "written by step(accuracy=)", "training accuracy"),
    Accumulator("grad_global_ss", "scalars", Merge.SUM, "step_set", "written at the step's end",
                "sum over all parameters of ||p.grad||^2", ranks=Ranks.SHARDS),
    Accumulator("loss_scale", "scalars", Merge.MAX, "step_set", "copied from the GradScaler once per step",
                "the AMP loss scale the step's backward ran with"),
    Accumulator("eval_loss", "scalars", Merge.WEIGHTED, "step_set", "written by log_eval(loss=)", "held-out loss"),
    Accumulator("eval_accuracy", "scalars", Merge.WEIGHTED, "step_set", "written by log_eval(accuracy=)",
                "held-out accuracy"),
    # where a framework clips: the global norm on both sides of the clip (one of them is grad_global_ss's)
    Accumulator("grad_pre_clip_ss", "scalars", Merge.SUM, "step_set",
                "read_gradients(clipped=False), or step(grad_norm_pre_clip=)^2 on rank 0",
                "sum over all parameters of ||p.grad||^2 before clipping", ranks=Ranks.SHARDS),
    Accumulator("grad_post_clip_ss", "scalars", Merge.SUM, "step_set",
                "read_gradients(clipped=True), or at optimizer.step() after read_gradients(clipped=False)",
                "sum over all parameters of ||p.grad||^2 after clipping", ranks=Ranks.SHARDS),
    # watch(noise_scale=True): each backward's own gradient, before it is added to .grad
    Accumulator("grad_small_ss", "scalars", Merge.SUM, "step_set",
                "per backward: sum over parameters of ||gradient it brought||^2; x k^2 at the step's end "
                "(k backwards on the rank), so each is on the scale of the update's gradient",
                "sum over the step's small batches (micro-batches of every rank) of |G_small|^2"),
)


class Layout:
    """The buffer columns of one table, in declaration order: ``index[name]`` and ``width``."""

    def __init__(self, table: str) -> None:
        self.table = table
        self.accumulators = tuple(a for a in ACCUMULATORS if a.table == table)
        self.index = {a.name: i for i, a in enumerate(self.accumulators)}
        self.width = len(self.accumulators)

    def __getitem__(self, name: str) -> Accumulator:
        return self.accumulators[self.index[name]]


LAYER, BLOCK, STEP = Layout("layers"), Layout("blocks"), Layout("scalars")

# Buffer columns the hot path addresses by number (an int is cheaper than a lookup there).
ACT_MEAN, ACT_VAR, ACT_ABSMAX, ACT_NONZERO, ACT_SAT = (LAYER.index[n] for n in (
    "act_mean", "act_var", "act_absmax", "act_nonzero", "act_saturated"))
GRAD_OUT_SS, PARAM_SS, GRAD_SS = (LAYER.index[n] for n in ("grad_out_ss", "param_ss", "grad_ss"))
B_DIFF_SS, B_INPUT_SS, B_COS_SUM, B_GRAD_IN_SS, B_GRAD_OUT_SS, B_BRANCH_SS, B_TOKEN_COS_SUM = (
    BLOCK.index[n] for n in ("diff_ss", "input_ss", "cos_sum", "grad_in_ss", "grad_out_ss", "branch_ss",
                             "token_cos_sum"))
LOSS, ACCURACY, GRAD_GLOBAL_SS, LOSS_SCALE, EVAL_LOSS, EVAL_ACCURACY, GRAD_PRE_CLIP_SS, GRAD_POST_CLIP_SS = (
    STEP.index[n] for n in ("loss", "accuracy", "grad_global_ss", "loss_scale", "eval_loss", "eval_accuracy",
                            "grad_pre_clip_ss", "grad_post_clip_ss"))
GRAD_SMALL_SS = STEP.index["grad_small_ss"]


def _fill(count: Count) -> float:
    """A fresh cell of ``count``: NaN for the float ones (a value not known), else zero."""
    return np.nan if count.dtype == "float64" else 0


class HostCounts:
    """The ``COUNTS`` of every buffer slot, as numpy arrays named after them (``counts.act_n``).

    Kept on the host so the hot path never reads the device: the finaliser uses them to drop
    empty cells, to weigh moments and to undo the AMP loss scale.
    """

    def __init__(self, slots: int, layers: int, blocks: int = 0) -> None:
        self.slots, self.layers, self.blocks = slots, layers, blocks
        for count in COUNTS:
            shape = {"phase_layer": (len(PHASES), layers), "layer": (layers,), "block": (blocks,),
                     "step": (), "step_stat": (STEP.width,)}[count.per]
            setattr(self, count.name, np.full((slots, *shape), _fill(count), count.dtype))

    def clear(self, slot: int) -> None:
        """Slot ``slot`` as a fresh one's, in place (every step opens a slot: no allocation there)."""
        for count in COUNTS:
            getattr(self, count.name)[slot] = _fill(count)

    def move(self, src: int, dst: int) -> None:
        for count in COUNTS:
            a = getattr(self, count.name)
            a[dst] = a[src]

    def take(self, n_slots: int) -> HostCounts:
        """A copy of the first ``n_slots`` slots, handed to the writer thread."""
        out = HostCounts(0, self.layers, self.blocks)
        out.slots = n_slots
        for count in COUNTS:
            setattr(out, count.name, getattr(self, count.name)[:n_slots].copy())
        return out


#: The columns one forward call writes, in order (``merge_partial`` merges them across calls).
ACTIVATION = LAYER.accumulators[ACT_MEAN:ACT_SAT + 1]


def merge_partial(accumulators: tuple[Accumulator, ...], a: Any, b: Any, n_a: Any, n_b: Any) -> list[Any]:
    """Merge two partial accumulators of the same cells by their declared rules.

    ``a[i]`` and ``b[i]`` hold ``accumulators[i]`` (torch tensors or numpy arrays, which broadcast
    with the counts ``n_a``/``n_b`` of their cells). Returns the merged values in order. Cells
    with a zero count merge to the other side's value.
    """
    n = n_a + n_b
    w_a, w_b = _ratio(n_a, n), _ratio(n_b, n)
    out = []
    for i, acc in enumerate(accumulators):
        x, y = a[i], b[i]
        if acc.merge is Merge.SUM:
            out.append(x + y)
        elif acc.merge is Merge.MAX:
            out.append(_maximum(x, y))
        elif acc.merge is Merge.MIN:
            out.append(-_maximum(-x, -y))
        elif acc.merge is Merge.WEIGHTED:
            out.append(x * w_a + y * w_b)
        else:  # WEIGHTED_VARIANCE, with its mean's column
            m = [c.name for c in accumulators].index(acc.mean)
            delta = b[m] - a[m]
            out.append(x * w_a + y * w_b + delta * delta * (w_a * w_b))
    return out


def _ratio(part: Any, whole: Any) -> Any:
    if isinstance(whole, (int, float)):
        return part / whole if whole else 0.0
    if not isinstance(whole, np.ndarray):  # a device tensor (counts the traced probes keep)
        return (part / whole.clamp_min(1)) * (whole > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(whole > 0, part / np.where(whole > 0, whole, 1), 0.0)


def _maximum(x: Any, y: Any) -> Any:
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return np.maximum(x, y)
    import torch  # device tensors (the schema itself needs no torch)

    return torch.maximum(x, y)


# ------------------------------------------------------------------------------ finalising


class Finalizer:
    """A table's accumulators and counts on the host, for the columns' ``finalize`` functions.

    ``acc(name)`` is the accumulator in float64 with NaN where its count says nothing was
    written; layer arrays are ``[slots, phases, layers]``, train-only ones NaN in the eval
    phase. ``scale`` undoes the AMP loss scale (1 without a scaler).
    """

    def __init__(self, layout: Layout, buf: np.ndarray, steps: np.ndarray, counts: Any,
                 row_facts: dict[str, np.ndarray] | None = None) -> None:
        self.layout, self.counts = layout, counts
        self.buf = buf.astype(np.float64)
        self.steps = steps.astype(np.float64)
        self.row_facts = row_facts or {}
        step_set = counts.step_set
        self.scale = np.where(step_set[:, LOSS_SCALE], self.steps[:, LOSS_SCALE], 1.0)  # [slots]
        self.grad_scale = np.where(counts.grads_scaled, self.scale, 1.0)  # parameter gradients'

    def count(self, name: str) -> np.ndarray:
        """A count shaped like the table's cells (layer counts without phase: train, 0 in eval)."""
        c = getattr(self.counts, name)
        if self.layout is LAYER and COUNT[name].per == "layer":
            out = np.full((c.shape[0], len(PHASES), c.shape[1]), np.nan if c.dtype.kind == "f" else 0, c.dtype)
            out[:, TRAIN] = c
            return out
        return c

    def acc(self, name: str) -> np.ndarray:
        i = self.layout.index[name]
        if self.layout is STEP:  # a step scalar is guarded by its own written-flag
            written = self.counts.step_set[:, i]
        else:
            written = self.count(self.layout.accumulators[i].count) > 0
        return np.where(written, self.buf[..., i], np.nan)

    def fact(self, name: str) -> np.ndarray:
        """A per-row fact of the layer table, broadcast over slots and phases."""
        return self.row_facts[name][None, None, :]


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def _sqrt(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.sqrt(x)


def _grad_out_ss(f: Finalizer) -> np.ndarray:
    """||dL/dy||^2 without the loss scale (gradients of a scaled loss carry it)."""
    return f.acc("grad_out_ss") / f.scale[:, None, None] ** 2


def _grad_norm(f: Finalizer) -> np.ndarray:
    """Parameter gradients carry the loss scale only until the scaler unscales them."""
    return _sqrt(f.acc("grad_ss") / f.grad_scale[:, None, None] ** 2)


def _block_grad(f: Finalizer, name: str) -> np.ndarray:
    return _sqrt(f.acc(name)) / f.scale[:, None]


def _update_ratio(f: Finalizer) -> np.ndarray:
    """NaN, not inf, for parameters that are all zero (a bias or a gamma initialised to 0): the
    ratio is undefined there, and an inf would read as a non-finite statistic."""
    w = _sqrt(f.acc("param_ss"))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(w > 0, f.count("lr") * _grad_norm(f) / np.where(w > 0, w, 1), np.nan)


def _grad_ratio(f: Finalizer) -> np.ndarray:
    """dL/dx over dL/dy where the call was compared with the identity (inf where dL/dy is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = _block_grad(f, "grad_in_ss") / _block_grad(f, "grad_out_ss")
    return np.where(f.count("block_samples") > 0, ratio, np.nan)


def _branch_ratio(f: Finalizer) -> np.ndarray:
    seen = (f.count("block_branch") > 0) & (f.count("block_samples") > 0) & ~f.count("block_branch_dropped")
    return np.where(seen, _sqrt(_div(f.buf[..., B_BRANCH_SS], f.buf[..., B_INPUT_SS])), np.nan)


def _scalar(name: str) -> Callable[[Finalizer], np.ndarray]:
    return lambda f: f.acc(name)


COLUMNS: tuple[Column, ...] = (
    # layers
    Column("act_mean", "layers", "float32", "mean of y", lambda f: f.acc("act_mean")),
    Column("act_std", "layers", "float32", "population std of y",
           lambda f: np.sqrt(np.maximum(f.acc("act_var"), 0))),
    Column("act_rms", "layers", "float32", "sqrt(mean(y^2))",
           lambda f: np.sqrt(np.maximum(np.square(f.acc("act_mean")) + f.acc("act_var"), 0))),
    Column("act_absmax", "layers", "float32", "max |y|", lambda f: f.acc("act_absmax")),
    Column("act_zero_frac", "layers", "float32", "fraction of y exactly 0 (ReLU-like modules; else NaN)",
           lambda f: np.where(f.fact("zero_counted"), _div(f.count("act_n") - f.buf[..., ACT_NONZERO],
                                                           f.count("act_n")), np.nan)),
    Column("act_sat_frac", "layers", "float32", "fraction of a bounded activation's y within 1% of a bound",
           lambda f: np.where(f.fact("bounded"), _div(f.buf[..., ACT_SAT], f.count("act_n")), np.nan)),
    Column("grad_out_norm", "layers", "float32", "||dL/dy||: the gradient flowing back through the layer",
           lambda f: _sqrt(_grad_out_ss(f))),
    Column("grad_out_rms", "layers", "float32", "RMS of dL/dy",
           lambda f: _sqrt(_div(_grad_out_ss(f), f.count("grad_n")))),
    Column("param_norm", "layers", "float32", "L2 norm of the module's own parameters",
           lambda f: _sqrt(f.acc("param_ss"))),
    Column("grad_norm", "layers", "float32", "L2 norm of their gradients", _grad_norm),
    Column("update_ratio", "layers", "float32",
           "lr * grad_norm / param_norm (NaN: lr unknown, or parameters all zero)", _update_ratio),
    # blocks
    Column("id_rel_residual", "blocks", "float32", "||y - x|| / ||x||: 0 is exactly the identity",
           lambda f: _sqrt(_div(f.acc("diff_ss"), np.where(f.count("block_samples") > 0, f.acc("input_ss"), 0)))),
    Column("id_cos", "blocks", "float32", "mean over samples of cos(x_i, y_i)",
           lambda f: _div(f.buf[..., B_COS_SUM], f.count("block_samples"))),
    Column("id_grad_ratio", "blocks", "float32", "||dL/dx|| / ||dL/dy||", _grad_ratio),
    Column("branch_ratio", "blocks", "float32", "||F(x)|| / ||x|| for a known residual branch F", _branch_ratio),
    Column("token_cos", "blocks", "float32", "mean pairwise cosine between a sample's tokens",
           lambda f: _div(f.buf[..., B_TOKEN_COS_SUM], f.count("block_tokens"))),
    Column("grad_in_norm", "blocks", "float32", "||dL/dx||", lambda f: _block_grad(f, "grad_in_ss")),
    Column("grad_out_norm", "blocks", "float32", "||dL/dy||", lambda f: _block_grad(f, "grad_out_ss")),
    # scalars
    Column("loss", "scalars", "float64", "training loss", _scalar("loss")),
    Column("accuracy", "scalars", "float64", "training accuracy", _scalar("accuracy")),
    Column("lr", "scalars", "float64", "learning rate of the first parameter group", lambda f: f.counts.step_lr),
    Column("grad_global_norm", "scalars", "float64", "L2 norm of all parameter gradients",
           lambda f: _sqrt(f.acc("grad_global_ss")) / f.grad_scale),
    Column("loss_scale", "scalars", "float64", "AMP loss scale", _scalar("loss_scale")),
    Column("eval_loss", "scalars", "float64", "held-out loss", _scalar("eval_loss")),
    Column("eval_accuracy", "scalars", "float64", "held-out accuracy", _scalar("eval_accuracy")),
    Column("grad_norm_pre_clip", "scalars", "float64", "global gradient norm before a framework clipped it",
           lambda f: _sqrt(f.acc("grad_pre_clip_ss")) / f.grad_scale),  # read when grad_global_ss was
    Column("grad_norm_post_clip", "scalars", "float64", "global gradient norm after clipping (what the update used)",
           lambda f: _sqrt(f.acc("grad_post_clip_ss"))),
    Column("grad_small_sq", "scalars", "float64", "mean over the step's small batches of |G_small|^2 "
           "(watch(noise_scale=True); gradscope.analyses.noise_scale)",
           lambda f: _div(f.acc("grad_small_ss"), f.counts.micro_batches.astype(np.float64)) / f.scale ** 2),
    Column("batch_small", "scalars", "float64", "samples in one small batch (a micro-batch of one rank)",
           lambda f: _div(f.counts.micro_samples.astype(np.float64), f.counts.micro_batches.astype(np.float64))),
    Column("small_batches", "scalars", "float64", "small batches in the step: backward passes over every rank",
           lambda f: np.where(f.counts.micro_batches > 0, f.counts.micro_batches.astype(np.float64), np.nan)),
    Column("batch_big", "scalars", "float64", "samples in the step's batch, over micro-batches and ranks",
           lambda f: np.where(f.counts.micro_batches > 0, f.counts.micro_samples.astype(np.float64), np.nan)),
    # attribution: computed on the device by recording.attribution, stored as they are
    Column("attr_sum", "attribution", "float32", "signed attribution of the block's output"),
    Column("attr_abs", "attribution", "float32", "absolute attribution of the block's output"),
    Column("branch_attr", "attribution", "float32", "attribution through the residual branch F(x)"),
    Column("skip_attr", "attribution", "float32", "attribution through the skip path"),
    Column("branch_share", "attribution", "float32", "the branch's share of the absolute attribution"),
    Column("skip_share", "attribution", "float32", "the skip's share of the absolute attribution"),
    # analyses (gradscope.analyses): computed once per checkpoint or run, stored as they are
    Column("autocorr_lag1", "shattering", "float64", "lag-1 autocorrelation of dL/dx along the line (1: smooth, "
           "0: white noise; Balduzzi et al. 2017)"),
    Column("spectrum_slope", "shattering", "float64", "slope of log power on log frequency of dL/dx along the line "
           "(0: white noise, -2: brown noise)"),
    Column("grad_norm_mean", "shattering", "float64", "mean over the points of ||dL/dx||"),
    Column("points", "shattering", "int64", "inputs on the line"),
    Column("line", "shattering", "object", "where the line runs (its two ends)"),
    Column("residual", "lesion", "bool", "the block adds its input back (False: plain, or not known)"),
    Column("order", "lesion", "int64", "the block's place among the blocks, in execution order"),
    Column("loss", "lesion", "float64", "loss with the block replaced by the identity (NaN: not replaceable)"),
    Column("accuracy", "lesion", "float64", "accuracy with the block replaced by the identity"),
    Column("base_loss", "lesion", "float64", "loss of the whole model on the same batch"),
    Column("base_accuracy", "lesion", "float64", "accuracy of the whole model on the same batch"),
    Column("loss_increase", "lesion", "float64", "loss - base_loss (Veit et al. 2016)"),
    Column("reason", "lesion", "object", "why the block was not replaced (it changes the shape)"),
    Column("b_small", "noise_scale", "float64", "samples in one small batch (a micro-batch of one rank)"),
    Column("b_big", "noise_scale", "float64", "samples in the step's whole batch"),
    Column("g_small_sq", "noise_scale", "float64", "mean over the small batches of |G_small|^2"),
    Column("g_big_sq", "noise_scale", "float64", "|G_big|^2: the squared norm of the step's gradient"),
    Column("g_sq", "noise_scale", "float64", "unbiased estimate of |G|^2 (McCandlish et al. 2018, A.1)"),
    Column("trace_sigma", "noise_scale", "float64", "unbiased estimate of tr(Sigma), per-example noise"),
    Column("g_sq_smooth", "noise_scale", "float64", "g_sq, exponentially smoothed over the recorded steps"),
    Column("trace_sigma_smooth", "noise_scale", "float64", "trace_sigma, smoothed alike"),
    Column("b_simple", "noise_scale", "float64", "trace_sigma_smooth / g_sq_smooth: the simple noise scale"),
)
#: Tables of each rank's own statistics, before merging (``watch(per_rank=True)``): the columns
#: of the merged table they follow, and a ``rank`` key.
BY_RANK = {"layers_by_rank": "layers", "blocks_by_rank": "blocks", "scalars_by_rank": "scalars"}
#: Tables the analyses write (gradscope.analyses), once asked: never by the recording hot path.
ANALYSES = ("shattering", "lesion", "noise_scale")
TABLES = ("layers", "blocks", "scalars", "attribution", *BY_RANK, *ANALYSES)


def columns(table: str) -> tuple[Column, ...]:
    table = BY_RANK.get(table, table)
    return tuple(c for c in COLUMNS if c.table == table)


#: Key columns of each table, before its statistics (pandas dtypes as ``load_run`` returns them).
KEYS = {
    "layers": {"step": "int64", "phase": "object", "layer": "object"},
    "blocks": {"step": "int64", "block": "object"},
    "scalars": {"step": "int64"},
    "attribution": {"step": "int64", "block": "object", "method": "object"},
    "layers_by_rank": {"step": "int64", "rank": "int64", "phase": "object", "layer": "object"},
    "blocks_by_rank": {"step": "int64", "rank": "int64", "block": "object"},
    "scalars_by_rank": {"step": "int64", "rank": "int64"},
    "shattering": {"step": "int64"},
    "lesion": {"step": "int64", "block": "object"},
    "noise_scale": {"step": "int64"},
}


def frame_dtypes(table: str) -> dict[str, str]:
    """Every column of ``table`` with its pandas dtype, keys first."""
    return {**KEYS[table], **{c.name: c.dtype for c in columns(table)}}


def kept_cells(table: str, f: Finalizer) -> np.ndarray:
    """Which cells of ``table`` become rows: those with anything recorded."""
    counts = f.counts
    if table == "layers":
        return (f.count("act_n") > 0) | (f.count("grad_n") > 0) | f.count("param_rows")
    if table == "blocks":
        return counts.block_calls > 0
    return counts.step_set.any(axis=1) | ~np.isnan(counts.step_lr)


def finalize(table: str, buf: np.ndarray, steps: np.ndarray, counts: Any,
             row_facts: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The stored columns of ``table`` from host copies of its buffer and the step buffer.

    Returns one entry per kept cell: every column of the table, plus the cell's coordinates
    (``slot``; ``phase`` and ``row`` for layers; ``row`` for blocks).
    """
    layout = {"layers": LAYER, "blocks": BLOCK, "scalars": STEP}[table]
    f = Finalizer(layout, buf if table != "scalars" else steps, steps, counts, row_facts)
    where = np.nonzero(kept_cells(table, f))
    out = {c.name: c.finalize(f)[where] for c in columns(table)}  # type: ignore[misc]
    out.update(zip(("slot", "phase", "row") if table == "layers" else ("slot", "row"), where))
    return out


def markdown() -> str:
    """The schema as the Markdown tables of docs/design.md ("Schema"), which a test keeps equal."""
    def row(*cells: str) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = ["Accumulators (device buffer columns, in buffer order per table):", "",
             "| table | column | accumulates | merges | over ranks | count | meaning |",
             "|---|---|---|---|---|---|---|"]
    for table, layout in (("layers", LAYER), ("blocks", BLOCK), ("scalars", STEP)):
        for i, a in enumerate(layout.accumulators):
            merge = a.merge.value + (f" (mean: `{a.mean}`)" if a.mean else "")
            lines.append(row(table, f"{i} `{a.name}`", a.accumulates, merge, a.ranks.value, f"`{a.count}`", a.meaning))
    lines += ["", "Host counts (numpy, per slot):", "", "| count | per | dtype | merges | over ranks | meaning |",
              "|---|---|---|---|---|---|"]
    lines += [row(f"`{c.name}`", c.per, c.dtype, c.merge.value, (c.over_ranks or c.merge).value, c.meaning)
              for c in COUNTS]
    lines += ["", "Stored columns (Parquet, after the key columns):", "", "| table | column | dtype | meaning |",
              "|---|---|---|---|"]
    for table in TABLES:
        lines.append(row(table, "keys: " + ", ".join(f"`{k}`" for k in KEYS[table]), "", ""))
        if table in BY_RANK:
            lines.append(row(table, f"the columns of `{BY_RANK[table]}`", "", "one rank's own statistics, unmerged"))
            continue
        lines += [row(table, f"`{c.name}`", c.dtype, c.meaning) for c in columns(table)]
    return "\n".join(lines) + "\n"
