"""The ``gradscope`` command: thin click commands over the library.

Bad input (unknown model or task, a missing or damaged run, an unwritable output) ends with one
line on stderr and exit code 2, never a traceback. Everything a command can check is checked
before it trains or writes anything. Output cut short by a closed pipe (``gradscope inspect run |
head``) ends quietly with exit code 1, as click and Python do for EPIPE.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from gradscope.cli.analyse import analyse_group
from gradscope.cli.common import FiniteFloat, InputError, friendly_errors, parse_settings, writable_dir

from gradscope import __version__
from gradscope.lab.presets import PRESETS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gradscope")
def main() -> None:
    """gradscope: see how gradients flow through PyTorch models while they train."""


@main.command("models")
@click.argument("pattern", default="*")
@friendly_errors
def models_command(pattern: str) -> None:
    """List reference models matching PATTERN (a glob, e.g. 'resnet*')."""
    from gradscope import models
    from gradscope.recording.blocks import declared_blocks

    names = models.names(pattern)
    if not names:
        raise InputError(f"no reference model matches {pattern!r}; try 'gradscope models'")
    rows = []
    for name in names:
        model = models.create(name)
        e = models.entry(name)
        rows.append((name, e.family, str(getattr(model, "depth", "-")),
                     f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M",
                     str(len(declared_blocks(model) or [])), e.description))
    header = ("name", "family", "depth", "params", "blocks", "description")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    for r in [header, *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])


def _train_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]"),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--progress/--no-progress", default=True, show_default=True, help="progress bar"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command("run")
@click.argument("model_names", metavar="MODEL...", nargs=-1, required=True)
@click.option("--task", default=None, help="built-in task (default: the model's usual one); see --help-tasks")
@click.option("--steps", default=500, show_default=True, type=click.IntRange(min=1))
@click.option("--every", default=10, show_default=True, type=click.IntRange(min=1), help="record every K steps")
@click.option("--out", default="runs", show_default=True, type=click.Path(path_type=Path),
              help="directory receiving one run per model")
@click.option("--batch-size", default=None, type=click.IntRange(min=1), help="override the recipe's batch size")
@click.option("--lr", default=None, type=FiniteFloat(min=0, min_open=True), help="override the recipe's lr")
@click.option("--eval-every", default=None, type=click.IntRange(min=1), help="held-out evaluation interval")
@click.option("--data-dir", default=None, type=click.Path(path_type=Path),
              help="local CIFAR-10 folder (--task cifar10)")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="model setting, e.g. --set depth=12")
@click.option("--amp", is_flag=True, help="mixed precision (CUDA only)")
@click.option("--watch-activations", is_flag=True, help="also record ReLU/sigmoid/... modules (dead, saturated units)")
@click.option("--attribution-every", default=None, type=click.IntRange(min=1), metavar="M",
              help="Captum attribution over the blocks every M steps, on 64 held-out samples")
@click.option("--attribution-method", default="grad_x_act", show_default=True,
              type=click.Choice(["grad_x_act", "integrated_gradients", "conductance"]),
              help="Captum layer method (the path-integral ones cost a pass per block)")
@click.option("--accumulate", default=1, show_default=True, type=click.IntRange(min=1), metavar="K",
              help="split each process's batch into K micro-batches, gradients added before the update")
@click.option("--noise-scale", is_flag=True, help="record each micro-batch's gradient norm for `gradscope analyse "
              "noise-scale` (needs --accumulate 2 or more, or --nproc 2 or more)")
@click.option("--shattering-every", default=None, type=click.IntRange(min=1), metavar="M",
              help="shattered-gradient measures every M steps and at the end (models with continuous inputs)")
@click.option("--overwrite", is_flag=True, help="replace existing runs of the same name")
@click.option("--nproc", default=1, show_default=True, type=click.IntRange(min=1), metavar="N",
              help="train data-parallel in N processes (DDP, started through torch.distributed.run); "
                   "the batch size is the global one, split evenly among them")
@_train_options
@friendly_errors
def run_command(model_names: tuple[str, ...], task: str | None, steps: int, every: int, out: Path,
                batch_size: int | None, lr: float | None, eval_every: int | None, data_dir: Path | None,
                settings: tuple[str, ...], amp: bool, watch_activations: bool, attribution_every: int | None,
                attribution_method: str, accumulate: int, noise_scale: bool, shattering_every: int | None,
                overwrite: bool, nproc: int,
                device: str, seed: int, progress: bool) -> None:
    """Train and record each MODEL on a built-in task, one run directory per model.

    \b
    Tasks: images (synthetic CIFAR-shaped), cifar10 (--data-dir), copy, reverse, dyck, majority.
    Example: gradscope run plain20 resnet20 --steps 300 --every 5 --out runs/cmp
    Several processes: --nproc 4 here, or torchrun --nproc-per-node 4 -m gradscope.cli.main run ...
    """
    from gradscope.lab import distributed
    from gradscope.lab.train import check, check_options, train
    from gradscope.store.writer import check_replaceable

    world = distributed.from_env()  # under torchrun: this process's place among its processes
    if world is not None and nproc not in (1, world.size):
        raise InputError(f"--nproc {nproc} under torchrun, which started {world.size} processes: "
                         "leave --nproc out there (torchrun's --nproc-per-node decides)")
    processes = world.size if world is not None else nproc
    # everything that can fail is checked for every model before the first one trains (or processes start)
    dev = check_options(steps=steps, every=every, lr=lr, batch_size=batch_size, eval_every=eval_every,
                        attribution_every=attribution_every, device=device, amp=amp, accumulate=accumulate,
                        shattering_every=shattering_every)
    if noise_scale and accumulate == 1 and processes == 1:
        raise InputError("--noise-scale compares small batches with the step's batch: add --accumulate 2 (or more) "
                         "or --nproc 2 (or more)")
    if world is None:
        distributed.check_launch(dev, processes)
    twice = sorted({name for name in model_names if model_names.count(name) > 1})
    if twice:
        raise InputError(f"{', '.join(twice)} named more than once: each model's run is written to "
                         f"{out / twice[0]}, so name a model once per command")
    overrides = parse_settings(settings)
    check(model_names, task, data_dir=str(data_dir) if data_dir else None, seed=seed, overrides=overrides,
          steps=steps, batch_size=batch_size, processes=processes, accumulate=accumulate,
          shattering=shattering_every is not None)
    if world is None or world.rank == 0:  # rank 0 writes the runs; the others would see its fresh directories
        for name in model_names:  # as the run writer decides, but before the first model trains
            check_replaceable(out / name, overwrite)
    writable_dir(out)
    if processes > 1 and world is None:
        raise click.exceptions.Exit(_launch(processes, _arguments_without(click.get_current_context(), "nproc")))
    for name in model_names:
        result = train(name, task=task, steps=steps, every=every, out=out, seed=seed, device=device, amp=amp,
                       batch_size=batch_size, lr=lr, eval_every=eval_every,
                       data_dir=str(data_dir) if data_dir else None, overrides=overrides,
                       overwrite=overwrite, progress=progress, watch_activations=watch_activations,
                       attribution_every=attribution_every, attribution_method=attribution_method,
                       accumulate=accumulate, noise_scale=noise_scale, shattering_every=shattering_every)
        if world is None or world.rank == 0:
            click.echo(f"{name}: {result.steps} steps in {result.seconds:.1f}s, final loss {result.final_loss:.4f}, "
                       f"held-out accuracy {result.final_eval_accuracy:.3f} -> {result.run}")


class ProcessFailed(click.ClickException):
    """A training process of a multi-process run failed; the command exits with its exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _arguments_without(ctx: click.Context, skip: str) -> list[str]:
    """The command line that gives ``ctx``'s command the values it parsed, less option ``skip``:
    what each process started for ``--nproc`` runs (options first, then ``--`` and the arguments)."""
    options: list[str] = []
    arguments: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)  # type: ignore[arg-type]
        if param.name == skip or value is None:
            continue
        if isinstance(param, click.Argument):
            arguments.extend(str(v) for v in value)
        elif isinstance(param, click.Option) and param.is_flag:
            if param.secondary_opts:  # --x/--no-x
                options.append(param.opts[0] if value else param.secondary_opts[0])
            elif value:
                options.append(param.opts[0])
        elif isinstance(param, click.Option):
            for item in value if param.multiple else [value]:
                options.extend([param.opts[0], str(item)])
    return [*options, "--", *arguments]


def _ending(exitcode: int) -> str:
    return f"exit code {exitcode}" if exitcode >= 0 else f"signal {-exitcode}"  # < 0: killed by that signal


def _launch(processes: int, arguments: list[str]) -> int:
    """Run ``gradscope run ARGUMENTS`` in ``processes`` processes on this machine through
    ``torch.distributed.run`` (torchrun --standalone); the exit code of the job.

    torchrun's agent runs here: it stops every process when one fails, or when this one is
    interrupted or terminated, before it returns. Each process gets an equal share of the
    cores (OMP_NUM_THREADS) unless the environment sets it.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads is None:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    try:
        torchrun(["--standalone", f"--nproc-per-node={processes}", "-m", "gradscope.cli.main", "run", *arguments])
    except ChildFailedError as exc:  # the agent saw these fail (earliest first) and stopped the others
        failed = sorted(exc.failures.items(), key=lambda item: (item[1].timestamp, item[0]))
        ranks = ", ".join(f"rank {rank} ({_ending(failure.exitcode)})" for rank, failure in failed)
        code = failed[0][1].exitcode
        raise ProcessFailed(f"{len(failed)} of {processes} training processes failed: {ranks}; "
                            "their messages are above", code if code > 0 else 1) from None
    except SignalException as exc:  # the agent stopped the processes first
        return 128 + int(exc.sigval)
    finally:
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
    return 0


main.add_command(analyse_group)


@main.command("inspect")
@click.argument("run_path", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--all", "show_all", is_flag=True, help="show every layer, not a sample")
@friendly_errors
def inspect_command(run_path: Path, show_all: bool) -> None:
    """Print a summary of a recorded RUN directory."""
    from gradscope.cli.summary import findings_text, run_summary

    import gradscope

    run = gradscope.load_run(run_path)
    click.echo(run_summary(run, limit=None if show_all else 16), nl=False)
    click.echo("\n" + findings_text(gradscope.diagnose(run)), nl=False)


@main.command("check")
@click.argument("run_paths", metavar="RUN...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--fail-on", type=click.Choice(["critical", "warning"]), default="warning", show_default=True,
              help="exit 1 when a finding this severe or more exists")
@click.option("--json", "as_json", is_flag=True, help="print the findings as JSON")
@friendly_errors
def check_command(run_paths: tuple[Path, ...], fail_on: str, as_json: bool) -> None:
    """Diagnose the RUN directories and exit 1 if any finding is at --fail-on or above (a CI gate).

    Exit codes: 0 healthy, 1 findings at the level, 2 bad input (a missing or damaged run).
    """
    import dataclasses
    import json

    from gradscope.cli.summary import findings_text

    import gradscope
    from gradscope.analysis.findings import at_or_above

    findings = gradscope.diagnose([gradscope.load_run(path) for path in run_paths])
    failing = at_or_above(findings, fail_on)
    if as_json:
        click.echo(json.dumps({"fail_on": fail_on, "failed": bool(failing),
                               "findings": [dataclasses.asdict(f) for f in findings]}, indent=2, default=str))
    else:
        click.echo(findings_text(findings), nl=False)
        click.echo(f"{len(failing)} finding(s) at {fail_on} or above" if failing
                   else f"healthy: no finding at {fail_on} or above")
    if failing:
        raise click.exceptions.Exit(1)


@main.command("coord-check")
@click.argument("model_name", metavar="MODEL")
@click.option("--widths", default="64,128,256,512", show_default=True, help="comma-separated widths")
@click.option("--steps", default=5, show_default=True, type=click.IntRange(min=2), help="steps recorded per width")
@click.option("--lr", default=1e-3, show_default=True, type=FiniteFloat(min=0, min_open=True), help="Adam's lr")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="model setting, e.g. --set depth=4")
@click.option("--max-slope", default=None, type=FiniteFloat(min=0), help="flag layers whose RMS grows faster "
              "than width**SLOPE (default 0.25)")
@click.option("--out", default=None, type=click.Path(path_type=Path), help="[default: runs/coord-MODEL]")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--overwrite", is_flag=True, help="replace existing runs of the same name")
@friendly_errors
def coord_check_command(model_name: str, widths: str, steps: int, lr: float, batch_size: int,
                        settings: tuple[str, ...], max_slope: float | None, out: Path | None, seed: int,
                        overwrite: bool) -> None:
    """muP's coordinate check of a reference MODEL: its first steps at each width, and a report of
    each layer's activation RMS against width (layers that grow with width are flagged)."""
    import torch
    from gradscope.cli.summary import findings_text

    from gradscope import reports
    from gradscope.analysis.coord import DEFAULT_MAX_SLOPE
    from gradscope.coordinate_check import coord_check, width_overrides
    from gradscope.lab import models

    try:
        sizes = [int(w) for w in widths.split(",") if w.strip()]
    except ValueError:
        raise InputError(f"--widths must be comma-separated integers, got {widths!r}") from None
    if len(set(sizes)) < 2 or min(sizes) < 1:
        raise InputError(f"--widths: give at least two different positive widths, got {widths!r}")
    extra = parse_settings(settings)
    for size in sizes:  # every width's settings, before anything is recorded
        width_overrides(model_name, size)
    models.create(model_name, **{**extra, **width_overrides(model_name, sizes[0])})  # the model and its settings
    out = out or Path("runs") / f"coord-{model_name}"
    writable_dir(out)
    check = coord_check(
        lambda w: models.create(model_name, **{**extra, **width_overrides(model_name, w)}), sizes,
        lambda step: models.example_input(model_name, batch=batch_size, seed=seed + 1 + step, **extra),
        steps, out=out, name=model_name, optimizer=lambda params: torch.optim.Adam(params, lr=lr), seed=seed,
        overwrite=overwrite, max_slope=DEFAULT_MAX_SLOPE if max_slope is None else max_slope)
    last = check.slopes[check.slopes.step == check.slopes.step.max()]
    click.echo(f"{model_name}: widths {', '.join(map(str, sizes))}, {steps} steps each -> {out}")
    for row in last.sort_values("rel_depth").itertuples():
        click.echo(f"  {row.layer:<40} act_rms ~ width^{row.slope:+.2f} at step {row.step}")
    click.echo("\n" + findings_text(check.findings), nl=False)
    report = reports.build(check.runs, out / "report.html", title=f"gradscope coordinate check: {model_name}")
    click.echo(f"report written to {report}")


@main.command("report")
@click.argument("run_paths", metavar="RUN...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", default="report.html", show_default=True, type=click.Path(path_type=Path))
@click.option("--title", default=None, help="page title (default: the run names)")
@friendly_errors
def report_command(run_paths: tuple[Path, ...], output: Path, title: str | None) -> None:
    """Write one self-contained HTML file comparing the RUN directories.

    Files among the RUN arguments (such as an earlier report matched by runs/x/*) are skipped
    with a note on stderr, as long as one run directory remains.
    """
    from gradscope import reports

    runs = [path for path in run_paths if not (path.exists() and not path.is_dir())]
    if not runs:
        raise InputError(f"no run directory among {', '.join(map(str, run_paths))}: give run directories")
    for path in run_paths:
        if path not in runs:
            click.echo(f"skipping {path}: a file, not a run directory", err=True)
    writable_dir(output.parent if str(output.parent) else Path("."))
    path = reports.build(runs, output, title=title)
    click.echo(f"report written to {path}")


@main.group("export")
def export_group() -> None:
    """Write recorded runs in another tool's format."""


@export_group.command("tensorboard")
@click.argument("run_paths", metavar="RUN...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--logdir", required=True, type=click.Path(path_type=Path), help="TensorBoard's log directory")
@click.option("--live", is_flag=True, help="follow runs being written until they end (Ctrl-C stops)")
@click.option("--interval", default=2.0, show_default=True, type=FiniteFloat(min=0.1), help="seconds between reads")
@click.option("--overwrite", is_flag=True, help="replace events an earlier export wrote for the same run")
@friendly_errors
def export_tensorboard_command(run_paths: tuple[Path, ...], logdir: Path, live: bool, interval: float,
                               overwrite: bool) -> None:
    """Write each RUN's per-layer and per-block figures and scalars as TensorBoard scalars.

    Tags are STATISTIC/LAYER, so TensorBoard groups them by statistic; view with
    tensorboard --logdir LOGDIR.
    """
    try:
        from gradscope.integrations import tensorboard
    except ImportError as exc:
        raise InputError(f"TensorBoard export needs the tensorboard package ({exc}): "
                         "pip install 'gradscope[tensorboard]'") from None
    writable_dir(logdir)
    if live:
        try:
            written = tensorboard.follow(run_paths, logdir, interval=interval, overwrite=overwrite,
                                         say=lambda line: click.echo(line, err=True))
        except KeyboardInterrupt:
            click.echo("stopped following", err=True)
            return
    else:
        written = tensorboard.export(run_paths, logdir, overwrite=overwrite)
    for name, count in written.items():
        click.echo(f"{name}: {count} scalars written to {logdir / name}")
    click.echo(f"view with: tensorboard --logdir {logdir}")


@main.command("demo")
@click.option("--preset", type=click.Choice(list(PRESETS)), default="pair", show_default=True,
              help="pair: plain20 vs resnet20; degradation: 20 and 56 layers; sigmoid: deep sigmoid MLPs; "
                   "transformer: Post-LN, Pre-LN and no residual")
@click.option("--quick", is_flag=True, help="a short version (under a minute on 2 CPU cores)")
@click.option("--out", default=None, type=click.Path(path_type=Path), help="[default: runs/demo-PRESET]")
@click.option("--steps", default=None, type=click.IntRange(min=1), help="training steps per model")
@_train_options
@friendly_errors
def demo_command(preset: str, quick: bool, out: Path | None, steps: int | None, device: str, seed: int,
                 progress: bool) -> None:
    """Train reference models on built-in data, record them, and write a comparison report.

    The default trains a plain and a residual network; --preset picks one of the seed's experiments.
    """
    from gradscope.cli.summary import findings_text, run_summary

    import gradscope
    from gradscope import reports
    from gradscope.lab.presets import run_preset

    p = PRESETS[preset]
    out = out or Path(f"runs/demo-{preset}")
    writable_dir(out)
    click.echo(f"gradscope demo ({preset}): {p.title}; {len(p.runs)} runs on task {p.task}")
    click.echo(f"what to look for: {p.shows}")
    start = time.perf_counter()
    results = run_preset(preset, out, quick=quick, steps=steps, device=device, seed=seed, progress=progress)
    runs = [gradscope.load_run(r.run) for r in results]
    for run in runs:
        click.echo("")
        click.echo(run_summary(run, limit=12), nl=False)
    click.echo("\n" + findings_text(gradscope.diagnose(runs)), nl=False)
    report = reports.build(runs, out / "report.html", title=f"gradscope demo: {p.title}")
    click.echo(f"\ndone in {time.perf_counter() - start:.0f}s; runs in {out}")
    click.echo(f"report written to {report} (open it in a browser)")


if __name__ == "__main__":  # how --nproc starts each process (python -m gradscope.cli.main run ...)
    main(prog_name="gradscope")
