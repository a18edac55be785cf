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

from gradscope.store import Run, load_run

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


def _non_finite_rows(run: Run) -> list[tuple[str, pd.DataFrame, str | None]]:
    """Rows holding inf, or NaN where a value was measured (absent values are NaN too).

    A NaN loss counts where the run records a loss on other steps; a NaN gradient norm counts
    where the optimizer step was seen (its learning rate is recorded alongside).
    """
    s, layers = training_steps(run.scalars), run.layers
    out = []
    if len(s):
        nan_loss = s.loss.isna() & s.loss.notna().any()
        nan_grad = s.grad_global_norm.isna() & s.lr.notna()
        out.append(("loss", s[np.isinf(s.loss) | np.isinf(s.grad_global_norm) | nan_loss | nan_grad], None))
    if len(layers):
        grads = layers[["grad_out_norm", "grad_norm"]].to_numpy(dtype=float)
        acts = layers[["act_mean", "act_std"]].to_numpy(dtype=float)
        measured = np.isfinite(layers.act_zero_frac.to_numpy(dtype=float))  # counts, finite if it ran
        out.append(("gradient", layers[np.isinf(grads).any(axis=1)], "layer"))
        out.append(("activation", layers[np.isinf(acts).any(axis=1) | (np.isnan(acts).any(axis=1) & measured)],
                    "layer"))
    return out


def _non_finite(run: Run) -> Iterable[Finding]:
    for what, rows, key in _non_finite_rows(run):
        if rows.empty:
            continue
        first = int(rows.step.min())
        yield Finding(
            "non_finite", "critical", f"Non-finite {what} values",
            f"{what} values are inf or NaN from step {first} on ({len(rows)} rows): training diverged or "
            "overflowed; lower the learning rate or clip gradients (under AMP, a GradScaler skips such "
            "steps by design).", _label(run), {"first_step": first, "rows": len(rows)},
            layers=_names(rows.drop_duplicates(key), key) if key else [], steps=[first])


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


def _update_ratio(run: Run) -> Iterable[Finding]:
    last = _last_step(_train_layers(run)).dropna(subset=["update_ratio"])
    last = last[np.isfinite(last.update_ratio)]
    if last.empty:
        return
    step = int(last.step.max())
    lrs = run.scalars[run.scalars.step == step].lr.dropna()
    at = f"at step {step}" + (f" (lr {_fmt(float(lrs.iloc[0]))})" if len(lrs) else "")
    for kind, rows, words in (("low", last[last.update_ratio < UPDATE_RATIO_LOW], "barely move"),
                              ("high", last[last.update_ratio > UPDATE_RATIO_HIGH], "are overwritten each step")):
        if len(rows):
            yield Finding(
                f"update_ratio_{kind}", "info", f"Update ratio far {'below' if kind == 'low' else 'above'} 1e-3",
                f"{at}, {len(rows)} layer(s) have lr * ||g|| / ||w|| {'below' if kind == 'low' else 'above'} "
                f"{_fmt(UPDATE_RATIO_LOW if kind == 'low' else UPDATE_RATIO_HIGH)} "
                f"(median {_fmt(rows.update_ratio.median())}; "
                f"about 1e-3 is typical for SGD): their weights {words}.",
                _label(run), {"median": float(rows.update_ratio.median())}, layers=_names(rows, "layer"), steps=[step])


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
    return sorted(findings, key=lambda f: (SEVERITIES.index(f.severity), f.run))
