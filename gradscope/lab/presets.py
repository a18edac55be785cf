"""The seed's experiments as presets: each trains a set of reference models on built-in data so
that one report shows a phenomenon the project's documents describe.

Durations are for 2 CPU cores with the default steps (measured; see the README).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradscope.lab.train import TrainResult, resolve_device, train


@dataclass(frozen=True)
class PresetRun:
    model: str
    run_name: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    shows: str  # what to look for, in one or two sentences
    task: str
    runs: tuple[PresetRun, ...]
    steps: int
    quick_steps: int
    every: int
    batch_size: int | None = None
    watch_activations: bool = False
    task_options: dict[str, Any] = field(default_factory=dict)  # e.g. smaller images on the CPU
    # Captum attribution checkpoints spread over the run (0: none). grad_x_act costs about one
    # training step each, so a handful fills the report's "Attribution flow" section cheaply.
    attribution_checkpoints: int = 0
    # settings that replace the ones above on CUDA, where the full-size problem is affordable
    gpu: dict[str, Any] = field(default_factory=dict)  # keys: steps, batch_size, task_options


def _runs(*specs: tuple[str, str, dict[str, Any]]) -> tuple[PresetRun, ...]:
    return tuple(PresetRun(model, name, overrides) for model, name, overrides in specs)


SIGMOID = {"depth": 20, "width": 128, "activation": "sigmoid"}

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("pair", "plain vs residual", "The residual network's blocks stay near the identity and its "
           "gradient reaches the first layers as strongly as the plain network's; both learn this easy task.",
           "images", _runs(("plain20", "plain20", {}), ("resnet20", "resnet20", {})),
           steps=300, quick_steps=40, every=5, batch_size=64, attribution_checkpoints=6),
    Preset("degradation", "degradation: plain vs residual at 20 and 56 layers",
           "The deeper plain network ends with the higher training loss while the residual pair does not. At "
           "initialisation its gradients grow toward the input rather than vanish (He et al. 2015 found healthy "
           "gradients); the findings say whether they decayed later in this run.",
           "images", _runs(("plain20", "plain20", {}), ("plain56", "plain56", {}),
                           ("resnet20", "resnet20", {}), ("resnet56", "resnet56", {})),
           # 2,000 steps are needed for the residual pair to fit (300 are not); on 2 CPU cores
           # they are affordable on 16x16 images in batches of 32, on a GPU at full size
           steps=2000, quick_steps=30, every=10, batch_size=32, task_options={"size": 16},
           gpu={"batch_size": 64, "task_options": {}}),
    Preset("sigmoid", "vanishing gradients in a deep sigmoid MLP",
           "The plain 20-layer sigmoid MLP's gradient vanishes toward the input (the sigmoid's derivative is at "
           "most 1/4); the residual one's does not, and a ReLU MLP with He initialisation keeps it healthy.",
           "images", _runs(("mlp_plain", "sigmoid-plain", SIGMOID), ("mlp_residual", "sigmoid-residual", SIGMOID),
                           ("mlp_plain", "relu-plain", {**SIGMOID, "activation": "relu"})),
           steps=300, quick_steps=40, every=5, batch_size=128, watch_activations=True),
    Preset("transformer", "Post-LN, Pre-LN and no residual",
           "Without residuals, token representations collapse (token_cos toward 1 within a few layers). "
           "Xiong et al. 2020's depth scaling holds per token (experiments/xiong_depth.py) but the recorded batch "
           "gradient also grows as tokens become alike, so Pre-LN's last-layer gradient at 24 layers is not "
           "smaller than at 6 here.",
           "dyck", _runs(("transformer_lm_post", "post-6", {"depth": 6}), ("transformer_lm_pre", "pre-6", {"depth": 6}),
                         ("transformer_lm_none", "none-6", {"depth": 6}),
                         ("transformer_lm_post", "post-24", {"depth": 24}),
                         ("transformer_lm_pre", "pre-24", {"depth": 24})),
           steps=200, quick_steps=20, every=5, batch_size=32),
)}


def run_preset(name: str, out: str | Path, *, quick: bool = False, steps: int | None = None,
               device: str = "auto", seed: int = 0, progress: bool = True) -> list[TrainResult]:
    """Train every run of preset ``name`` into ``out/<run name>``; returns their results."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    p = PRESETS[name]
    on_gpu = resolve_device(device).type == "cuda"
    settings = {"steps": p.steps, "batch_size": p.batch_size, "task_options": p.task_options,
                **(p.gpu if on_gpu else {})}
    n = steps or (p.quick_steps if quick else settings["steps"])
    every = min(p.every, max(1, n // 10))
    attribution = {"attribution_every": attribution_interval(n, p.attribution_checkpoints)} \
        if p.attribution_checkpoints else {}
    return [train(r.model, task=p.task, steps=n, every=every, out=out, run_name=r.run_name, seed=seed,
                  device=device, batch_size=settings["batch_size"], overrides=r.overrides, overwrite=True,
                  progress=progress, watch_activations=p.watch_activations,
                  eval_limit=256 if quick else 1000, task_options=settings["task_options"], **attribution)
            for r in p.runs]


def attribution_interval(steps: int, checkpoints: int) -> int:
    """Steps between attribution checkpoints so that ``steps`` hold about ``checkpoints`` of them
    (at 0, every, 2 every, ...; a run shorter than that gets one per step)."""
    return max(1, -(-steps // checkpoints))
