"""Findings: plain-language rules over a run's tables, each with the numbers behind it.

Every rule reports what the data shows, with its evidence, and no more. In particular the
degradation rule says whether the deeper plain network's gradients actually vanished: He et al.
2015 (section 4.1) found degradation in BatchNorm plain networks whose gradients were healthy,
and with BatchNorm a deep plain network at initialisation even amplifies the gradient toward the
input (Yang et al. 2019).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradscope.analysis.coord import growing_layers
from gradscope.store import Run, load_run
from gradscope.store.meta import PARAMETER_TYPE

# --- Thresholds, with where they come from -------------------------------------------------
#: Gradient flow is judged on ||dL/dy|| of the hidden layers (the head excluded), fitted on a
#: log scale against depth. "Vanishing" when the fitted gradient at the first hidden layer is
#: below 1/100 of the last hidden layer's; "exploding toward the input" when above 100 times.
#: Two orders of magnitude across a network is where He et al. 2015 (sec. 4.1) would no longer
#: call gradients "healthy"; a deep sigmoid MLP (Glorot and Bengio 2010) is many orders below,
#: a BatchNorm plain-56 at initialisation about 1e4 above (Yang et al. 2019), a ResNet-56 ~20.
VANISHING_SPAN = 1e-2
EXPLODING_SPAN = 1e2
#: Layers needed for a fit to mean anything.
MIN_LAYERS_FOR_FIT = 4
#: Outputs exactly zero for this fraction of elements: ReLU units that no longer fire
#: ("dying ReLU"; CS231n notes that 40% of a network can die with too high a learning rate).
DEAD_FRACTION = 0.9
#: Bounded activations with this fraction of outputs within 1% of a bound: saturated units pass
#: almost no gradient (Glorot and Bengio 2010 saw top sigmoid layers saturate early in training).
SATURATED_FRACTION = 0.5
#: Blocks with ||y - x|| / ||x|| below this act almost as the identity (the residual branch adds
#: little); above ``FAR_FROM_IDENTITY`` they change their input as much as it is large, as plain
#: layers do (a plain-56 at init measured about 1.2, a ResNet-56 about 0.4).
NEAR_IDENTITY = 0.05
FAR_FROM_IDENTITY = 1.0
#: Mean pairwise token cosine above this at the last block: representations have collapsed
#: toward rank one (Dong et al. 2021; Noci et al. 2022).
RANK_COLLAPSE = 0.9
#: lr * ||g|| / ||w|| is about 1e-3 in healthy SGD training (Karpathy, CS231n); two orders of
#: magnitude either way means the layer barely learns or is being overwritten every step.
UPDATE_RATIO_LOW = 1e-5
UPDATE_RATIO_HIGH = 1e-1
#: Degradation: the deeper plain network's final training loss exceeds the shallower one's by
#: this relative margin (He et al. 2015 Fig. 1 and 6: plain-56 above plain-20 throughout) and by
#: at least ``DEGRADATION_MIN_GAP`` nats, so two nearly fitted nets (0.006 vs 0.016) do not count:
#: at that level the gap is within the run-to-run noise of a few hundred steps.
DEGRADATION_MARGIN = 0.10
DEGRADATION_MIN_GAP = 0.05
#: Final training loss = mean over this last fraction of recorded steps (smooths batch noise).
FINAL_FRACTION = 0.1

SEVERITIES = ("critical", "warning", "info")


def at_or_above(findings: list[Finding], level: str) -> list[Finding]:
    """The findings as severe as ``level`` or more (``gradscope check --fail-on``, ``assert_healthy``)."""
    if level not in SEVERITIES:
        raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}, got {level!r}")
    return [f for f in findings if SEVERITIES.index(f.severity) <= SEVERITIES.index(level)]


@dataclass
class Finding:
    """One diagnosis: what, why it matters, and the numbers that support it."""

    code: str
    severity: str  # "critical", "warning" or "info"
    title: str
    explanation: str
    run: str
    evidence: dict[str, Any] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.explanation = self.explanation[:1].upper() + self.explanation[1:]
        self.steps = [int(s) for s in self.steps]

    def __str__(self) -> str:
        return f"[{self.severity}] {self.run}: {self.title}. {self.explanation}"


# --- helpers ---------------------------------------------------------------------------------


def _label(run: Run) -> str:
    return run.path.name


def _train_layers(run: Run) -> pd.DataFrame:
    return run.layers[run.layers.phase == "train"]


def _fmt(x: float) -> str:
    return f"{x:.2g}"


def _names(frame: pd.DataFrame, column: str, limit: int = 8) -> list[str]:
    return frame[column].astype(str).tolist()[:limit]


@dataclass
class GradientFit:
    step: int
    layers: int
    per_layer: float  # fitted factor multiplying ||dL/dy|| at each layer toward the input
    span: float  # fitted gradient at the first hidden layer over the last hidden layer


def gradient_fit(layers: pd.DataFrame, step: int, column: str = "grad_out_norm") -> GradientFit | None:
    """Fit log10 ||dL/dy|| against depth over the hidden layers (the last layer, the head, left out)."""
    at = layers[(layers.step == step)].dropna(subset=["depth"]).sort_values("depth")
    at = at[np.isfinite(at[column]) & (at[column] > 0)]
    if len(at) > MIN_LAYERS_FOR_FIT:
        at = at.iloc[:-1]
    if len(at) < MIN_LAYERS_FOR_FIT:
        return None
    index = np.arange(len(at), dtype=float)
    slope = np.polyfit(index, np.log10(at[column].to_numpy(dtype=float)), 1)[0]
    return GradientFit(int(step), len(at), float(10 ** -slope), float(10 ** (-slope * (len(at) - 1))))


# --- rules on one run -------------------------------------------------------------------------


def _gradient_flow(run: Run) -> Iterable[Finding]:
    train = _train_layers(run)
    if train.empty:
        return
    steps = sorted(train.step.unique())
    fits = [f for f in (gradient_fit(train, s) for s in {steps[0], steps[-1]}) if f is not None]
    for kind, test in (("vanishing", lambda f: f.span < VANISHING_SPAN),
                       ("exploding", lambda f: f.span > EXPLODING_SPAN)):
        hits = sorted((f for f in fits if test(f)), key=lambda f: f.step)
        if not hits:
            continue
        f = hits[-1]
        where = "at initialisation" if f.step == steps[0] and len(hits) == 1 else f"at step {f.step}"
        if kind == "vanishing":
            yield Finding(
                "vanishing_gradient", "warning", "Vanishing gradient toward the input",
                f"{where}, the gradient flowing back is multiplied by {_fmt(f.per_layer)} at each layer toward "
                f"the input (fitted on a log scale over {f.layers} hidden layers), so the first hidden layer gets "
                f"{_fmt(f.span)} of the last hidden layer's gradient and learns correspondingly slowly.",
                _label(run), {"per_layer_factor": f.per_layer, "first_over_last": f.span, "layers": f.layers},
                steps=[h.step for h in hits])
        else:
            yield Finding(
                "exploding_gradient", "warning", "Gradient grows toward the input",
                f"{where}, the gradient flowing back grows by a factor {_fmt(f.per_layer)} at each layer "
                f"toward the input (fitted over {f.layers} hidden layers): "
                f"the first hidden layer gets {_fmt(f.span)} times "
                "the last hidden layer's gradient. With BatchNorm this is what deep plain networks do at "
                "initialisation (Yang et al. 2019); it is not a vanishing gradient.",
                _label(run), {"per_layer_factor": f.per_layer, "first_over_last": f.span, "layers": f.layers},
                steps=[h.step for h in hits])


def training_steps(scalars: pd.DataFrame) -> pd.DataFrame:
    """Scalar rows of training steps (eval-only rows left out): anything but eval recorded."""
    return scalars.dropna(subset=["loss", "accuracy", "lr", "grad_global_norm"], how="all")


# --- non-finite values ------------------------------------------------------------------------

#: Layer statistics by what a NaN in them can mean (an absent value is NaN too, see ``non_finite_cells``).
ACTIVATION_STATS = ("act_mean", "act_std", "act_rms", "act_absmax")
GRADIENT_STATS = ("grad_out_norm", "grad_out_rms")
LAYER_STATS = (*ACTIVATION_STATS, "act_zero_frac", "act_sat_frac", *GRADIENT_STATS, "param_norm", "grad_norm",
               "update_ratio")
#: ``id_grad_ratio`` is left out: it is inf by definition where dL/dy is 0 (``store.schema``).
BLOCK_STATS = ("id_rel_residual", "id_cos", "branch_ratio", "token_cos", "grad_in_norm", "grad_out_norm")
SCALAR_STATS = ("loss", "accuracy", "grad_global_norm", "eval_loss", "eval_accuracy")
_SCALAR_WORDS = {"loss": "the training loss", "accuracy": "the training accuracy",
                 "grad_global_norm": "the global gradient norm", "eval_loss": "the held-out loss",
                 "eval_accuracy": "the held-out accuracy"}


def _col(frame: pd.DataFrame, column: str) -> np.ndarray:
    return frame[column].to_numpy(dtype=float) if column in frame else np.full(len(frame), np.nan)


def _gradient_broken_steps(scalars: pd.DataFrame) -> set[int]:
    """Steps whose global gradient norm is a measured inf or NaN. It is written at every step's
    end with the learning rate, so a NaN where the lr is known was measured (also without an
    optimizer when the run records a finite one on other steps)."""
    if scalars.empty:
        return set()
    g = _col(scalars, "grad_global_norm")
    written = scalars.lr.notna().to_numpy() | (np.isfinite(g).any() & scalars.loss.notna().to_numpy())
    return set(scalars.step[np.isinf(g) | (np.isnan(g) & written)].astype(int))


def non_finite_cells(run: Run) -> dict[str, pd.DataFrame]:
    """Which stored statistics of ``run`` are measured NaN or inf: per table (``layers``,
    ``blocks``, ``scalars``), a boolean frame with the table's index and its statistic columns.

    An inf is always measured. A NaN also stands for "not recorded", so it counts only where the
    row shows the measurement ran:

    - activation statistics (``act_*``): the layer's output was seen, i.e. another activation
      statistic is present, or the zero or saturation fraction (finite whenever the output was
      seen), or in a training row the gradient at the output (its probe is attached to the output
      by the forward hook);
    - ``param_norm``: the layer has parameters of its own (their norms are written every step);
    - ``grad_out_*``, ``grad_norm``: only in a step whose global gradient norm is itself non-finite,
      where the output was seen (for ``grad_norm`` also: the layer has parameters, or is a row of
      parameters no module owns), and only for layers that have that gradient in the run's other
      steps: a frozen layer, or a first layer whose output needs no gradient, reads the same as a
      NaN there, so it is told apart only where some step was unbroken;
    - ``update_ratio``: where ``grad_norm`` or ``param_norm`` counts and the step's lr is known;
    - the loss where the run records one on other steps; the global gradient norm as above.

    Outside these (a NaN-emitting layer with no gradient and neither a zero nor a saturation
    count, e.g. in an eval forward) a NaN cannot be told from a missing value.
    """
    layers, blocks, scalars = run.layers, run.blocks, run.scalars
    # layers
    v = {c: _col(layers, c) for c in LAYER_STATS}
    train = (layers.phase == "train").to_numpy() if len(layers) else np.zeros(0, bool)
    act = np.column_stack([v[c] for c in ACTIVATION_STATS]) if len(layers) else np.zeros((0, 4))
    grad_seen = train & (~np.isnan(v["grad_out_norm"]) | ~np.isnan(v["grad_out_rms"]))
    seen = (~np.isnan(act)).any(axis=1) | ~np.isnan(v["act_zero_frac"]) | ~np.isnan(v["act_sat_frac"]) | grad_seen
    params = run.layer_table.set_index("name").params if "params" in run.layer_table else pd.Series(dtype=float)
    owns = layers.layer.map(params).fillna(0).to_numpy(dtype=float) > 0 if len(layers) else np.zeros(0, bool)
    owns |= ~np.isnan(v["param_norm"])
    broken_steps = _gradient_broken_steps(scalars)
    broken_step = layers.step.isin(broken_steps).to_numpy() if len(layers) else train
    broken = broken_step & train
    no_probe = (layers.type == PARAMETER_TYPE).to_numpy() if "type" in layers else np.zeros(len(layers), bool)
    lr_known = layers.step.map(scalars.drop_duplicates("step").set_index("step").lr).notna().to_numpy() \
        if len(layers) and len(scalars) else np.zeros(len(layers), bool)
    nan = {c: np.isnan(x) for c, x in v.items()}
    out = {c: np.isinf(x) for c, x in v.items()}
    for c in ACTIVATION_STATS:
        out[c] |= nan[c] & seen
    for c, could in (("grad_out_norm", seen), ("grad_out_rms", seen), ("grad_norm", owns & (seen | no_probe))):
        # a layer that has no such gradient in an unbroken step (frozen, or an output needing none)
        # has none in a broken one either
        never = set(layers.layer[nan[c] & could & train & ~broken_step])
        out[c] |= nan[c] & could & broken & ~layers.layer.isin(never).to_numpy()
    out["param_norm"] |= nan["param_norm"] & owns & train
    out["update_ratio"] |= nan["update_ratio"] & lr_known & (out["grad_norm"] | out["param_norm"])
    cells = {"layers": pd.DataFrame(out, index=layers.index)}
    # blocks: only inf (a block that changed shape records NaN with a reason)
    cells["blocks"] = pd.DataFrame({c: np.isinf(_col(blocks, c)) for c in BLOCK_STATS}, index=blocks.index)
    # scalars
    sv = {c: _col(scalars, c) for c in SCALAR_STATS}
    sout = {c: np.isinf(x) for c, x in sv.items()}
    trained = scalars.index.isin(training_steps(scalars).index)
    sout["loss"] |= np.isnan(sv["loss"]) & trained & (~np.isnan(sv["loss"])).any()
    sout["grad_global_norm"] |= scalars.step.isin(broken_steps).to_numpy() \
        if len(scalars) else np.zeros(0, bool)
    cells["scalars"] = pd.DataFrame(sout, index=scalars.index)
    return cells


def non_finite_kinds(values: np.ndarray) -> str:
    """Which of NaN and inf ``values`` hold, in words: NaN, inf, or NaN and inf."""
    kinds = [k for k, hit in (("NaN", np.isnan(values).any()), ("inf", np.isinf(values).any())) if hit]
    return " and ".join(kinds)


def non_finite_items(frame: pd.DataFrame, mask: pd.DataFrame, key: str) -> list[dict[str, Any]]:
    """One entry per ``key`` (layer or block) with flagged cells: its name, type, first step, the
    statistics that are non-finite and whether NaN or inf.

    Likeliest source first: the earliest step; within it, a non-finite output before a non-finite
    gradient or parameter (the forward runs first), outputs in network order (the first one
    poisons the rest), gradients from the output back (the backward runs that way).
    """
    hit = mask.any(axis=1)
    if not hit.any():
        return []
    rows = frame[hit.to_numpy()]
    items = []
    for name, group in rows.groupby(key, sort=False):
        m = mask.loc[group.index]
        stats = [c for c in m.columns if m[c].any()]
        values = group[stats].to_numpy(dtype=float)[m[stats].to_numpy()]
        first = int(group.step.min())
        output = bool(m[[c for c in ACTIVATION_STATS if c in m]].loc[(group.step == first).to_numpy()].any().any())
        depth = float(group.depth.iloc[0]) if "depth" in group and pd.notna(group.depth.iloc[0]) else 0.0
        items.append({"name": str(name), "type": str(group.type.iloc[0]) if "type" in group else "?",
                      "first_step": first, "statistics": stats, "kinds": non_finite_kinds(values),
                      "order": (first, not output, depth if output else -depth)})
    return sorted(items, key=lambda i: i["order"])


#: Layers and blocks spelled out in a non-finite finding's text (all are in ``Finding.layers``).
_SPELLED_OUT = 4


def _non_finite(run: Run) -> Iterable[Finding]:
    """One critical finding per run that names every layer, block and scalar with a measured NaN
    or inf, the statistics, and the step each first appears: a NaN hidden downstream (by
    ``torch.nan_to_num``, a mask, a clamp) leaves the loss finite, and only the layers show it."""
    cells = non_finite_cells(run)
    s_mask = cells["scalars"]
    scalars = [(c, int(run.scalars.step[s_mask[c].to_numpy()].min()),
                non_finite_kinds(run.scalars[c].to_numpy(dtype=float)[s_mask[c].to_numpy()]))
               for c in s_mask.columns if s_mask[c].any()]
    layers = non_finite_items(run.layers, cells["layers"], "layer")
    blocks = non_finite_items(run.blocks, cells["blocks"], "block")
    if not (scalars or layers or blocks):
        return
    first = min([s for _, s, _ in scalars] + [i["first_step"] for i in layers + blocks])
    parts = [f"{_SCALAR_WORDS[c]} is {k} from step {s}" for c, s, k in scalars]
    for what, items in (("layer", layers), ("block", blocks)):
        spelled = [f"{what} {i['name']} ({i['type']}) has {i['kinds']} {', '.join(i['statistics'])} "
                   f"from step {i['first_step']}" for i in items[:_SPELLED_OUT]]
        if len(items) > _SPELLED_OUT:
            spelled.append(f"{len(items) - _SPELLED_OUT} more {what}s do too")
        parts += spelled
    loss_finite = not any(c == "loss" for c, _, _ in scalars) and run.scalars.loss.notna().any()
    if layers and loss_finite:
        source = layers[0]
        advice = (f"The loss stayed finite, so something after these layers (torch.nan_to_num, a mask, a clamp) "
                  f"hides the problem; look first at {source['name']} ({source['type']}), the likeliest source "
                  f"(the earliest {'output' if not source['order'][1] else 'gradient'} to go non-finite).")
    else:
        advice = ("Training diverged or overflowed; lower the learning rate or clip gradients (under AMP, a "
                  "GradScaler skips such steps by design).")
    located = run.meta.get("nonfinite") or []  # found while recording, by pass (recording.nonfinite)
    if located:
        what = {"grad_out_norm": "the output gradient", "grad_norm": "the parameters' gradient"}
        passes = [f"in the {e['phase']} pass, {what.get(e['statistic'], 'the output')} of {e['layer']} ({e['type']})"
                  for e in located]
        advice = (f"Where it started, at step {located[0]['step']}: the first watched layer to go non-finite was, "
                  f"{'; and '.join(passes)}; every later layer of a pass inherits it. {advice}")
    yield Finding(
        "non_finite", "critical", f"Non-finite values (NaN or inf) from step {first}",
        f"{'; '.join(parts)}. {advice}", _label(run),
        {"first_step": first, "layers_affected": len(layers), "blocks_affected": len(blocks),
         "values": int(sum(int(m.to_numpy().sum()) for m in cells.values()))},
        layers=[i["name"] for i in layers], blocks=[i["name"] for i in blocks], steps=[first])


def _last_step(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame.step == frame.step.max()] if len(frame) else frame


def _unit_fraction_rule(run: Run, column: str, threshold: float, code: str, title: str,
                        what: str, consequence: str, evidence_key: str) -> Iterable[Finding]:
    """Layers at the last step whose fraction ``column`` of outputs exceeds ``threshold``."""
    last = _last_step(_train_layers(run))
    hit = last[last[column] > threshold].sort_values(column)
    if len(hit):
        yield Finding(
            code, "warning", title,
            f"{len(hit)} {what} more than {threshold:.0%} of their elements (worst {hit[column].max():.0%} "
            f"in {hit.layer.iloc[-1]}): {consequence}", _label(run), {evidence_key: float(hit[column].max())},
            layers=_names(hit, "layer"), steps=[int(last.step.max())])


def _dead_units(run: Run) -> Iterable[Finding]:
    return _unit_fraction_rule(
        run, "act_zero_frac", DEAD_FRACTION, "dead_units", "Dead units",
        "layer(s) output exactly zero for", "these ReLU units no longer fire, so no gradient passes through them.",
        "max_zero_fraction")


def _saturation(run: Run) -> Iterable[Finding]:
    return _unit_fraction_rule(
        run, "act_sat_frac", SATURATED_FRACTION, "saturated_units", "Saturated sigmoid/tanh units",
        "bounded activation layer(s) are within 1% of a bound for",
        "there the derivative is almost zero and the gradient stops.", "max_saturated_fraction")


def _identity(run: Run) -> Iterable[Finding]:
    last = _last_step(run.blocks).dropna(subset=["id_rel_residual"])
    if last.empty:
        return
    step = int(last.step.max())
    near = last[last.id_rel_residual < NEAR_IDENTITY]
    far = last[last.id_rel_residual > FAR_FROM_IDENTITY]
    if len(near):
        yield Finding(
            "near_identity_blocks", "info", "Blocks close to the identity",
            f"{len(near)} of {len(last)} blocks change their input by less than {NEAR_IDENTITY:.0%} "
            f"(||y - x|| / ||x|| as low as {_fmt(near.id_rel_residual.min())}): their residual branches "
            "contribute little, so the network behaves as if it were shallower.",
            _label(run), {"min_rel_residual": float(near.id_rel_residual.min())}, blocks=_names(near, "block"),
            steps=[step])
    if len(far):
        yield Finding(
            "far_from_identity_blocks", "info", "Blocks far from the identity",
            f"{len(far)} of {len(last)} blocks change their input by more than its own size "
            f"(mean ||y - x|| / ||x|| {_fmt(far.id_rel_residual.mean())}): a signal crossing them is "
            "transformed as in a plain network, with no identity path to fall back on.",
            _label(run), {"mean_rel_residual": float(far.id_rel_residual.mean())}, blocks=_names(far, "block"),
            steps=[step])


def _rank_collapse(run: Run) -> Iterable[Finding]:
    last = _last_step(run.blocks).dropna(subset=["token_cos"])
    if last.empty:
        return
    final = last.sort_values("depth").iloc[-1]
    if final.token_cos > RANK_COLLAPSE:
        collapsed = last[last.token_cos > RANK_COLLAPSE]
        yield Finding(
            "rank_collapse", "warning", "Token representations collapsed",
            f"at the last block the mean cosine between tokens is {final.token_cos:.3f}: all positions carry "
            "nearly the same vector (rank collapse, as attention without skip connections does).",
            _label(run), {"last_block_token_cos": float(final.token_cos)}, blocks=_names(collapsed, "block"),
            steps=[int(last.step.max())])


def peak_lr_step(scalars: pd.DataFrame, steps: Iterable[int]) -> int | None:
    """The last of ``steps`` at which the learning rate was at its highest over them (None where
    the lr is not known): the step at which the run's configuration, not its decay, sets the
    size of the updates."""
    lr = scalars.dropna(subset=["lr"]).drop_duplicates("step").set_index("step").lr
    lr = lr[lr.index.isin(list(steps))]
    if lr.empty or not np.isfinite(lr.max()):
        return None
    return int(lr.index[lr >= lr.max() * (1 - 1e-9)].max())


def _update_ratio(run: Run) -> Iterable[Finding]:
    """lr * ||g|| / ||w|| of each layer, judged against its typical 1e-3.

    The ratio is proportional to the learning rate, so a schedule's decay (/100 by the end of a
    step schedule) shrinks every layer's ratio by the same factor, on purpose. A layer is said
    to barely move only if its ratio is below ``UPDATE_RATIO_LOW`` at the last recorded step
    *and* at the last recorded step where the learning rate was at its highest (warm-up and
    decay excluded): that is the update size the configuration chose, so a frozen layer
    (lr 0, no gradient) or a learning rate too small for the model is caught, and a planned
    decay is not. Too large a ratio is judged at the last step (decay only lowers it).
    """
    train = _train_layers(run).dropna(subset=["update_ratio"])
    train = train[np.isfinite(train.update_ratio)]
    if train.empty:
        return
    step = int(train.step.max())
    last = train[train.step == step]
    peak = peak_lr_step(run.scalars, train.step.unique())
    lrs = run.scalars.dropna(subset=["lr"]).drop_duplicates("step").set_index("step").lr
    at = f"at step {step}" + (f" (lr {_fmt(float(lrs[step]))})" if step in lrs.index else "")
    low = last[last.update_ratio < UPDATE_RATIO_LOW]
    evidence: dict[str, Any] = {}
    peak_words = ""
    if peak is not None and peak != step and len(low):
        at_peak = train[train.step == peak].set_index("layer").update_ratio
        low = low[~(low.layer.map(at_peak) >= UPDATE_RATIO_LOW).to_numpy()]  # no ratio at the peak: unexplained
        peak_words = (f", and were below it at step {peak} too, when the learning rate was at its highest "
                      f"({_fmt(float(lrs[peak]))}), so the schedule's decay does not explain it")
        evidence = {"peak_lr_step": peak, "peak_lr": float(lrs[peak])}
    for kind, rows, words in (("low", low, "barely move"),
                              ("high", last[last.update_ratio > UPDATE_RATIO_HIGH], "are overwritten each step")):
        if len(rows):
            yield Finding(
                f"update_ratio_{kind}", "info", f"Update ratio far {'below' if kind == 'low' else 'above'} 1e-3",
                f"{at}, {len(rows)} layer(s) have lr * ||g|| / ||w|| {'below' if kind == 'low' else 'above'} "
                f"{_fmt(UPDATE_RATIO_LOW if kind == 'low' else UPDATE_RATIO_HIGH)} "
                f"(median {_fmt(rows.update_ratio.median())}; "
                f"about 1e-3 is typical for SGD){peak_words if kind == 'low' else ''}: their weights {words}.",
                _label(run), {"median": float(rows.update_ratio.median()), **(evidence if kind == "low" else {})},
                layers=_names(rows, "layer"), steps=[step] if kind == "high" or not evidence else [peak, step])


RULES = (_non_finite, _gradient_flow, _dead_units, _saturation, _identity, _rank_collapse, _update_ratio)


# --- rules across runs ------------------------------------------------------------------------


def final_loss(run: Run) -> float:
    losses = training_steps(run.scalars).loss
    if losses.empty:
        return math.nan
    tail = max(1, int(math.ceil(len(losses) * FINAL_FRACTION)))
    return float(losses.iloc[-tail:].mean())


def _worse(deep: float, shallow: float) -> bool:
    return deep > shallow * (1 + DEGRADATION_MARGIN) and deep - shallow > DEGRADATION_MIN_GAP


def _plain_or_residual(run: Run) -> str | None:
    residual = run.block_table.residual.dropna()
    if residual.empty:
        return None
    return "residual" if residual.astype(bool).all() else "plain" if not residual.astype(bool).any() else None


def _degradation(runs: Sequence[Run], findings: list[Finding]) -> Iterable[Finding]:
    vanishing = {f.run for f in findings if f.code == "vanishing_gradient"}
    groups: dict[tuple[str, str], dict[str, list[Run]]] = {}
    for run in runs:
        kind, depth = _plain_or_residual(run), run.meta.get("model", {}).get("depth")
        if kind is None or not isinstance(depth, int):
            continue
        family = run.meta.get("model", {}).get("class", "?")
        task = (run.meta.get("task") or {}).get("name", "?")
        groups.setdefault((family, task), {}).setdefault(kind, []).append(run)
    for (_, task), kinds in groups.items():
        plain = sorted(kinds.get("plain", []), key=lambda r: r.meta["model"]["depth"])
        if len(plain) < 2:
            continue
        shallow, deep = plain[0], plain[-1]
        ls, ld = final_loss(shallow), final_loss(deep)
        if not _worse(ld, ls):
            continue
        residual = {r.meta["model"]["depth"]: r for r in kinds.get("residual", [])}
        d_s, d_d = shallow.meta["model"]["depth"], deep.meta["model"]["depth"]
        twin = ""
        evidence: dict[str, Any] = {"shallow_plain_loss": ls, "deep_plain_loss": ld}
        if d_s in residual and d_d in residual:
            rs, rd = final_loss(residual[d_s]), final_loss(residual[d_d])
            evidence.update(shallow_residual_loss=rs, deep_residual_loss=rd)
            if _worse(rd, rs):
                twin = (f" The residual twins degrade too ({_fmt(rs)} -> {_fmt(rd)}), "
                        "so this is not the plain-network effect alone.")
            else:
                twin = (f" Their residual twins do not ({_label(residual[d_s])} {_fmt(rs)}, "
                        f"{_label(residual[d_d])} {_fmt(rd)}).")
        grad = (" The deeper plain network's gradients did vanish, which contributes."
                if _label(deep) in vanishing else
                " Its gradients did not vanish: this is degradation without vanishing gradient, as He et al. 2015 "
                "found, an optimisation difficulty rather than a lack of signal.")
        yield Finding(
            "degradation", "warning", "Degradation: the deeper plain network trains worse",
            f"on task {task}, {_label(deep)} ({d_d} layers) ends with training loss {_fmt(ld)}, above "
            f"{_label(shallow)} ({d_s} layers) at {_fmt(ls)}; more depth made training worse, not better.{twin}{grad}",
            f"{_label(shallow)} vs {_label(deep)}", evidence)


def _width_growth(runs: Sequence[Run]) -> Iterable[Finding]:
    """Coordinate checks (``gradscope.coord_check``) whose layers' activations grow with width."""
    for check in growing_layers(runs):
        flagged = check["layers"]
        if not flagged:
            continue
        named = ", ".join(f"{f['layer']} (width^{_fmt(f['slope'])} at step {f['step']})"
                          for f in flagged[:_SPELLED_OUT])
        more = f" and {len(flagged) - _SPELLED_OUT} more" if len(flagged) > _SPELLED_OUT else ""
        yield Finding(
            "width_growth", "warning", "Activations grow with width (coordinate check)",
            f"across widths {', '.join(map(str, check['widths']))}, the output RMS of {named}{more} grows faster than "
            f"width^{_fmt(check['max_slope'])} once training starts: an update moves these layers' outputs by about "
            "lr x fan-in, so wider models take larger steps there and hyperparameters tuned at one width will not "
            "transfer. Under a width-stable parameterisation (muP: a 1/width readout, per-layer learning rates) "
            "each stays flat.", check["group"],
            {"widths": len(check["widths"]), "layers_growing": len(flagged), "steepest_slope": flagged[0]["slope"]},
            layers=[f["layer"] for f in flagged], steps=sorted({f["step"] for f in flagged}))


def _as_runs(runs: Run | str | os.PathLike[str] | Sequence[Run | str | os.PathLike[str]]) -> list[Run]:
    if isinstance(runs, (Run, str, os.PathLike)):
        runs = [runs]
    return [r if isinstance(r, Run) else load_run(Path(r)) for r in runs]


def diagnose(runs: Run | str | os.PathLike[str] | Sequence[Run | str | os.PathLike[str]]) -> list[Finding]:
    """Findings for one run or several (cross-run rules such as degradation need several).

    Sorted by severity, then by run.
    """
    loaded = _as_runs(runs)
    findings = [f for run in loaded for rule in RULES for f in rule(run)]
    findings += list(_degradation(loaded, findings))
    findings += list(_width_growth(loaded))
    return sorted(findings, key=lambda f: (SEVERITIES.index(f.severity), f.run))
