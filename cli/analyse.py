"""``gradscope analyse``: the published analyses (``gradscope.analyses``) on runs ``gradscope run`` made.

Each command checks every run it is given before it computes anything, stores its table in each
run (read back by ``load_run``, shown by ``gradscope report``) and prints what it found.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from gradscope.cli.common import FiniteFloat, InputError, friendly_errors

_RUNS = click.argument("run_paths", metavar="RUN...", nargs=-1, required=True, type=click.Path(path_type=Path))
_DEVICE = click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]")
_DATA_DIR = click.option("--data-dir", default=None, type=click.Path(path_type=Path),
                         help="local CIFAR-10 folder, for runs trained on --task cifar10")


@click.group("analyse")
def analyse_group() -> None:
    """Shattered gradients, lesions, gradient noise scale: stored in each RUN, shown by `gradscope report`."""


def _rebuilt(run_paths: tuple[Path, ...], device: str, data_dir: Path | None, *, trained: bool
             ) -> list[tuple[Path, Any, Any, dict]]:
    """Every run's reference model (initial, or with its kept weights), checked before any analysis runs."""
    from gradscope.lab.train import rebuild, resolve_device

    dev, where = resolve_device(device), str(data_dir) if data_dir else None
    return [(path, *rebuild(path, trained=trained, device=dev, data_dir=where)) for path in run_paths]


def _last_step(meta: dict[str, Any]) -> int:
    schedule = meta.get("schedule") or {}
    return int(schedule.get("last_step") or 0)


@analyse_group.command("shattering")
@_RUNS
@click.option("--points", default=256, show_default=True, type=click.IntRange(min=8), help="inputs on the line")
@_DEVICE
@_DATA_DIR
@friendly_errors
def shattering_command(run_paths: tuple[Path, ...], points: int, device: str, data_dir: Path | None) -> None:
    """dL/dx along the line between two held-out inputs, at initialisation and after training.

    Balduzzi et al. 2017: in a deep plain network the input gradient decorrelates like white noise
    (lag-1 autocorrelation near 0, flat spectrum); skip connections keep it correlated (near 1).
    For token inputs the line runs between the two inputs' token embeddings.
    """
    import pandas as pd

    from gradscope import analyses
    from gradscope.lab.train import shattering_line

    trained = _rebuilt(run_paths, device, data_dir, trained=True)
    lines = []
    for path, model, task, meta in trained:
        try:
            lines.append(shattering_line(task, model, str((meta.get("model") or {}).get("registry_name"))))
        except ValueError as exc:
            raise InputError(f"run {path}: {exc}") from None
    initial = _rebuilt(run_paths, device, data_dir, trained=False)
    for (path, model, _, meta), (_, first, _, _), (start, end, at) in zip(trained, initial, lines):
        rows = pd.concat([analyses.shattering(first, start, end, points=points, at=at, step=0),
                          analyses.shattering(model, start, end, points=points, at=at, step=_last_step(meta))],
                         ignore_index=True)
        analyses.save(path, "shattering", rows)
        before, after = rows.iloc[0], rows.iloc[1]
        click.echo(f"{path}: lag-1 autocorrelation {before.autocorr_lag1:.3f} at step 0, {after.autocorr_lag1:.3f} "
                   f"at step {after.step}; spectrum slope {before.spectrum_slope:.2f} -> {after.spectrum_slope:.2f}")


@analyse_group.command("lesion")
@_RUNS
@click.option("--samples", default=256, show_default=True, type=click.IntRange(min=1),
              help="held-out samples the loss is measured on")
@_DEVICE
@_DATA_DIR
@friendly_errors
def lesion_command(run_paths: tuple[Path, ...], samples: int, device: str, data_dir: Path | None) -> None:
    """The trained model's held-out loss with each block replaced by the identity, block by block.

    Veit et al. 2016: a residual network loses little without any one block (it acts like an
    ensemble of paths); a plain network without one of its layers is broken.
    """
    import numpy as np

    from gradscope import analyses

    for path, model, task, meta in _rebuilt(run_paths, device, data_dir, trained=True):
        dev = next(model.parameters()).device
        inputs = task.test_inputs
        x = tuple(t[:samples].to(dev) for t in inputs) if isinstance(inputs, tuple) else inputs[:samples].to(dev)
        rows = analyses.lesion(model, x, task.test_targets[:samples].to(dev), step=_last_step(meta))
        analyses.save(path, "lesion", rows)
        done = rows["loss_increase"].dropna()
        if done.empty:
            click.echo(f"{path}: no block keeps its input's shape, so none could be replaced by the identity")
            continue
        worst = rows.loc[done.idxmax()]
        click.echo(f"{path}: {len(done)} of {len(rows)} blocks replaced; median loss increase {np.median(done):.4g} "
                   f"over {rows.base_loss.iloc[0]:.4g}, largest {worst.loss_increase:.4g} ({worst.block})")


@analyse_group.command("noise-scale")
@_RUNS
@click.option("--smoothing", default=0.9, show_default=True, type=FiniteFloat(min=0, max=1, max_open=True),
              help="exponential moving average factor for |G|^2 and tr(Sigma)")
@click.option("--batch-small", default=None, type=click.IntRange(min=1), metavar="N",
              help="samples per micro-batch, where the run could not count them (a model compiled in place)")
@friendly_errors
def noise_scale_command(run_paths: tuple[Path, ...], smoothing: float, batch_small: int | None) -> None:
    """B_simple = tr(Sigma) / |G|^2 over training, from the small batches a run recorded.

    McCandlish et al. 2018: batches much larger than B_simple buy little per sample. Record the run
    with `gradscope run --noise-scale --accumulate K` (or --nproc N), or watch(noise_scale=True).
    """
    import numpy as np

    from gradscope import analyses

    tables = [(path, analyses.noise_scale(path, smoothing=smoothing, batch_small=batch_small))
              for path in run_paths]  # all checked first
    for path, rows in tables:
        analyses.save(path, "noise_scale", rows)
        b = rows["b_simple"].to_numpy()
        picks = sorted({0, len(rows) // 2, len(rows) - 1})
        where = ", ".join(f"{b[i]:.4g} at step {rows.step.iloc[i]}" for i in picks)
        click.echo(f"{path}: B_simple {where} (batch {rows.b_big.iloc[-1]:.0f}; median {np.nanmedian(b):.4g})")
