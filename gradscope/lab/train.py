"""The small trainer behind the CLI: one reference model, one built-in task, recorded by watch().

Each family trains with the recipe it is known by, scaled to the step budget:

- ResNets and plain nets (He et al. 2015, CIFAR): SGD, momentum 0.9, weight decay 1e-4,
  batch 128, lr 0.1 divided by 10 at 50% and 75% of the steps (32k and 48k of 64k); the
  110-layer nets warm up at lr 0.01 for the first 0.6% of steps (400 of 64k).
- Deep MLPs: SGD, momentum 0.9, lr 0.05, batch 128, constant: no adaptive optimiser, so that
  vanishing gradients show in the learning as well as in the statistics.
- Transformers (Vaswani et al. 2017): Adam (0.9, 0.98, eps 1e-9), batch 64, lr 1e-3 with linear
  warm-up over 10% of the steps, then inverse square-root decay.

Under torchrun (``WORLD_SIZE`` above 1) the same trainer runs in every process, data-parallel
(see ``gradscope.lab.distributed``): the recipe's batch is the global one, split evenly.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradscope import analyses
from gradscope.lab import distributed, models
from gradscope.lab.tasks import DEFAULT_TASK, Task, check_task, get_task
from gradscope.lab.tasks.sequences import IGNORE
from gradscope.lab.trained import load_weights, save_weights
from gradscope.recording.attribution import Attribution
from gradscope.recording.entry import watch
from gradscope.recording.layers import with_activations
from gradscope.store.meta import RunError, read_meta

PROBE_SIZE = 64  # held-out samples in the attribution probe batch


@dataclass(frozen=True)
class Recipe:
    """Optimiser and schedule of one training run (JSON-safe, stored in meta.json)."""

    optimizer: str  # "sgd" or "adam"
    lr: float
    batch_size: int
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "constant"  # "constant", "step" (/10 at 50% and 75%), "warmup_rsqrt"
    warmup_steps: int = 0
    warmup_lr: float | None = None  # "step" schedule: constant warm-up lr before the main one


def recipe_for(name: str, steps: int) -> Recipe:
    """The family recipe of reference model ``name`` for a budget of ``steps``."""
    e = models.entry(name)
    if e.family in ("resnet", "plain", "preresnet"):
        deep = name.endswith("110")
        return Recipe("sgd", 0.1, 128, momentum=0.9, weight_decay=1e-4, schedule="step",
                      warmup_steps=max(1, round(steps * 400 / 64000)) if deep else 0,
                      warmup_lr=0.01 if deep else None)
    if e.family == "transformer":
        return Recipe("adam", 1e-3, 64, schedule="warmup_rsqrt", warmup_steps=max(1, steps // 10))
    return Recipe("sgd", 0.05, 128, momentum=0.9)


def _recipe(name: str, steps: int, batch_size: int | None, lr: float | None) -> Recipe:
    """The family recipe with the caller's batch size and learning rate, where given."""
    recipe = recipe_for(name, steps)
    if batch_size is not None or lr is not None:
        recipe = Recipe(**{**asdict(recipe), **{k: v for k, v in (("batch_size", batch_size), ("lr", lr))
                                                 if v is not None}})
    return recipe


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                               weight_decay=recipe.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), eps=1e-9,
                            weight_decay=recipe.weight_decay)


def lr_factor(recipe: Recipe, steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr at each step, for ``torch.optim.lr_scheduler.LambdaLR``."""
    w = recipe.warmup_steps
    if recipe.schedule == "step":
        warm = (recipe.warmup_lr or recipe.lr) / recipe.lr
        return lambda s: warm if s < w else 0.1 ** ((s >= steps // 2) + (s >= steps * 3 // 4))
    if recipe.schedule == "warmup_rsqrt":
        return lambda s: (s + 1) / w if s < w else math.sqrt(w / (s + 1))
    return lambda s: 1.0


def record_steps(model: nn.Module, run: str | Path, optimizer: torch.optim.Optimizer,
                 batch_fn: Callable[[int], tuple[Any, Tensor]], loss_fn: Callable[[Any, Tensor], Tensor], steps: int,
                 **watch_kwargs: Any) -> Path:
    """Train ``model`` ``steps`` plain steps under ``watch()`` (``batch_fn(step)`` gives inputs and
    targets): the loop of the analyses that record a user's model (health check, coordinate check)."""
    with watch(model, run, optimizer=optimizer, **watch_kwargs) as rec:
        for step in range(steps):
            inputs, targets = batch_fn(step)
            optimizer.zero_grad()
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            rec.step(loss=loss)
            optimizer.step()
    return Path(run)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but this PyTorch sees no CUDA device")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    return torch.device(device)


def build(name: str, task: str | None = None, *, data_dir: str | None = None, seed: int = 0,
          overrides: dict[str, Any] | None = None,
          task_options: dict[str, Any] | None = None) -> tuple[nn.Module, Task]:
    """A reference model and the task it trains on, agreeing on classes, vocabulary and length.

    ``task_options`` go to the task's maker (e.g. ``{"size": 16}`` for smaller synthetic images).
    """
    return _build(name, task, data_dir=data_dir, seed=seed, overrides=overrides, task_options=task_options,
                  make_task=get_task)


def _build(name: str, task: str | None, *, data_dir: str | None, seed: int, overrides: dict[str, Any] | None,
           task_options: dict[str, Any] | None, make_task: Callable[..., Task]) -> tuple[nn.Module, Task]:
    e = models.entry(name)
    overrides = dict(overrides or {})
    task_name = _check_settings(name, task, overrides, data_dir)
    options = {"seq_len": overrides.get("seq_len", e.defaults["seq_len"])} if "seq_len" in e.defaults and \
        task_name != "cifar10" else {}
    the_task = make_task(task_name, e.input_kind, data_dir=data_dir, seed=seed,
                         **{**options, **(task_options or {})})
    implied = {k: v for k, v in the_task.model_overrides.items() if k in e.defaults}
    clash = {k for k in implied if k in overrides and overrides[k] != implied[k]}
    if clash:
        raise ValueError(f"task {task_name!r} fixes {', '.join(f'{k}={implied[k]}' for k in sorted(clash))}")
    torch.manual_seed(seed)
    return models.create(name, **{**overrides, **implied}), the_task


def rebuild(run: str | os.PathLike[str], *, trained: bool, device: str | torch.device = "cpu",
            data_dir: str | None = None) -> tuple[nn.Module, Task, dict[str, Any]]:
    """The reference model of a run ``gradscope run`` made, with its task and meta.json: as it
    began (``trained=False``: the seeded initialisation) or as it ended (the weights it kept).
    ``data_dir``: where the task's data is, for tasks read from disk (``cifar10``)."""
    path = Path(run)
    meta = read_meta(path)
    model_meta, task_meta = meta.get("model") or {}, meta.get("task") or {}
    name = model_meta.get("registry_name")
    if not name or not task_meta.get("name"):
        raise RunError(f"run {path} was not made by `gradscope run` (its meta.json names no reference model "
                       "and task); call gradscope.analyses on the model in Python instead")
    model, task = build(name, task_meta["name"], seed=int(task_meta.get("seed", 0)), data_dir=data_dir,
                        overrides=model_meta.get("config") or {}, task_options=task_meta.get("options") or {})
    if trained:
        load_weights(model, path)
    return model.to(device), task, meta


def _check_settings(name: str, task: str | None, overrides: dict[str, Any], data_dir: str | None) -> str:
    """The task ``name`` trains on, once its settings and the task's name and kind are known good
    (nothing is built)."""
    e = models.entry(name)
    unknown = set(overrides) - set(e.defaults)
    if unknown:
        raise ValueError(f"{name} has no setting {', '.join(sorted(unknown))}; "
                         f"it takes {', '.join(sorted(e.defaults))}")
    task_name = task or DEFAULT_TASK[e.input_kind]
    check_task(task_name, e.input_kind, data_dir=data_dir)
    return task_name


def check(names: Sequence[str], task: str | None = None, *, data_dir: str | None = None, seed: int = 0,
          overrides: dict[str, Any] | None = None, task_options: dict[str, Any] | None = None,
          steps: int = 1, batch_size: int | None = None, processes: int = 1, accumulate: int = 1,
          shattering: bool = False) -> None:
    """Raise what ``train`` would raise for any of ``names`` about its model and task, before any trains.

    The CLI trains several models in one command: a setting that does not fit the last one must
    not surface after the first has trained. The cheap checks run for every model first; then
    each model is built on the CPU, as ``train`` builds it, and dropped, each task built once.
    With ``processes`` above 1, each model's global batch must split evenly over them.
    """
    for name in names:
        _check_settings(name, task, dict(overrides or {}), data_dir)
    tasks: dict[str, Task] = {}

    def make_task(*args: Any, **kwargs: Any) -> Task:
        key = repr((args, sorted(kwargs.items())))
        if key not in tasks:
            tasks[key] = get_task(*args, **kwargs)
        return tasks[key]

    for name in names:
        model, the_task = _build(name, task, data_dir=data_dir, seed=seed, overrides=overrides,
                                 task_options=task_options, make_task=make_task)
        micro_batches(distributed.share(min(_recipe(name, steps, batch_size, None).batch_size, the_task.train_size),
                                        processes), accumulate)
        if shattering:
            shattering_line(the_task, model, name)


def check_options(*, steps: int = 1, every: int = 1, lr: float | None = None, batch_size: int | None = None,
                  eval_every: int | None = None, eval_limit: int = 1, attribution_every: int | None = None,
                  device: str = "auto", amp: bool = False, accumulate: int = 1,
                  shattering_every: int | None = None) -> torch.device:
    """The device to train on, once the options are known good: counts of at least 1, a learning
    rate that is a positive finite number, a device that exists, AMP only on CUDA.

    A NaN learning rate passes ``lr > 0`` checks (every comparison with NaN is false) and would
    only fail once a run directory exists; infinity trains nothing but NaNs.
    """
    for label, value, required in (("steps", steps, True), ("every", every, True), ("batch_size", batch_size, False),
                                   ("eval_every", eval_every, False), ("eval_limit", eval_limit, True),
                                   ("attribution_every", attribution_every, False), ("accumulate", accumulate, True),
                                   ("shattering_every", shattering_every, False)):
        if value is None and not required:
            continue
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{label} must be an integer of at least 1, got {value!r}")
    if lr is not None:
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    dev = resolve_device(device)
    if amp and dev.type != "cuda":
        raise ValueError("AMP (--amp) is for CUDA devices; this run is on the CPU")
    return dev


def _forward(model: nn.Module, x: Any) -> Tensor:
    return model(*x) if isinstance(x, tuple) else model(x)


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, tuple):
        return tuple(t.to(device, non_blocking=True) for t in x)
    return x.to(device, non_blocking=True)


def loss_and_accuracy(out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy and accuracy over scored positions (targets != -100), as device scalars."""
    logits, target = out.float().flatten(0, -2), y.flatten()
    scored = target != IGNORE
    loss = F.cross_entropy(logits, target, ignore_index=IGNORE)
    correct = ((logits.argmax(-1) == target) & scored).sum()
    return loss, correct / scored.sum().clamp_min(1)


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, device: torch.device, batch_size: int = 256,
             limit: int = 1000) -> tuple[Tensor, Tensor]:
    """Mean loss and accuracy on (up to ``limit`` samples of) the held-out set, in eval mode."""
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), device=device)
    total_acc = torch.zeros((), device=device)
    batches = 0
    seen = 0
    for x, y in task.test_batches(batch_size):
        if seen >= limit:
            break
        loss, acc = loss_and_accuracy(_forward(model, _to(x, device)), y.to(device))
        total_loss += loss
        total_acc += acc
        batches += 1
        seen += len(y)
    model.train(was_training)
    return total_loss / max(batches, 1), total_acc / max(batches, 1)


@dataclass
class TrainResult:
    run: Path
    steps: int
    seconds: float
    final_loss: float
    final_eval_accuracy: float


def train(
    name: str,
    *,
    task: str | None = None,
    steps: int = 500,
    every: int = 10,
    out: str | Path = "runs",
    run_name: str | None = None,
    seed: int = 0,
    device: str = "auto",
    amp: bool = False,
    batch_size: int | None = None,
    lr: float | None = None,
    eval_every: int | None = None,
    eval_limit: int = 1000,
    data_dir: str | None = None,
    overrides: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    watch_activations: bool = False,
    attribution_every: int | None = None,
    attribution_method: str = "grad_x_act",
    task_options: dict[str, Any] | None = None,
    accumulate: int = 1,
    noise_scale: bool = False,
    shattering_every: int | None = None,
) -> TrainResult:
    """Train reference model ``name`` on a built-in task for ``steps`` steps, recording the run.

    The run is written to ``out/run_name`` (default ``out/<name>``). Held-out loss and accuracy
    are recorded every ``eval_every`` steps (default: five times a run) and at the end, on up to
    ``eval_limit`` held-out samples. ``watch_activations`` also records activation modules
    (ReLU, sigmoid, ...), where dead and saturated units show. ``attribution_every`` adds
    Captum attribution checkpoints over the blocks, on the first ``PROBE_SIZE`` held-out samples.

    Under torchrun every process calls ``train`` alike. The trainer joins the default process
    group (formed at the first call, kept until exit), wraps the model in DDP and trains each
    process on its slice of the global batch, which must split evenly. The recorded loss and
    accuracy are the means over the processes (``watch`` merges the ranks'), and so is the
    returned loss. Every process evaluates the same held-out samples, so all agree, and passes
    the same attribution probe to ``watch``. Only rank 0 shows progress.

    ``accumulate`` splits each process's batch into that many micro-batches, their gradients
    added before the update (the same update, in more, smaller backward passes).
    ``noise_scale`` records each micro-batch's gradient norm (``watch(noise_scale=True)``) for
    ``gradscope.analyses.noise_scale``. ``shattering_every`` stores the shattering measures
    (``gradscope.analyses.shattering``, on the line between the first two held-out inputs) at
    steps 0, M, 2M, ... and at the end, computed on rank 0 between steps. When training ends the
    weights are kept in the run (``model.safetensors``) for the other analyses.
    """
    dev = check_options(steps=steps, every=every, lr=lr, batch_size=batch_size, eval_every=eval_every,
                        eval_limit=eval_limit, attribution_every=attribution_every, device=device, amp=amp,
                        accumulate=accumulate, shattering_every=shattering_every)
    world = distributed.from_env()
    if world is not None:
        dev = distributed.device_for(dev, world)
    model, the_task = build(name, task, data_dir=data_dir, seed=seed, overrides=overrides, task_options=task_options)
    model.to(dev)
    recipe = _recipe(name, steps, batch_size, lr)
    batch = min(recipe.batch_size, the_task.train_size)
    micro_batches(distributed.share(batch, world.size if world else 1), accumulate)  # refused before any process waits
    if world is not None:  # the same initial weights everywhere (build seeded), then a random stream per rank
        torch.manual_seed(seed + world.rank)
    opt = make_optimizer(model, recipe)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(recipe, steps))
    amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if amp and amp_dtype == torch.float16 else None
    # a multiple of `every`, so each evaluation lands on a recorded step (the one it precedes)
    eval_every = -(-(eval_every or max(every, steps // 5)) // every) * every

    path = Path(out) / (run_name or name)
    meta = {"task": {"name": the_task.name, "description": the_task.description,
                     "train_size": the_task.train_size, "seed": seed, "options": dict(task_options or {})},
            "recipe": {**asdict(recipe), "batch_size": batch, "steps": steps, "amp": amp, "accumulate": accumulate}}
    bar = _progress(steps, f"{name}", enabled=progress and (world is None or world.rank == 0))
    start = time.perf_counter()
    final_loss, final_acc = float("nan"), float("nan")
    modules = with_activations if watch_activations else None
    attribution = None
    if attribution_every is not None:
        probe = (_head(the_task.test_inputs, PROBE_SIZE), the_task.test_targets[:PROBE_SIZE])
        attribution = Attribution(probe, every=attribution_every, method=attribution_method)
    line = shattering_line(the_task, model, name) if shattering_every else None
    checkpoints = line is not None and (world is None or world.rank == 0)  # rank 0 writes the run
    net = distributed.wrap(model, dev, world)  # the model itself when training alone
    with watch(net, path, every=every, optimizer=opt, scaler=scaler, overwrite=overwrite, meta=meta,
               modules=modules, attribution=attribution, noise_scale=noise_scale) as rec:
        batches = the_task.batches(batch, seed=seed)
        for step in range(steps):
            if checkpoints and step % shattering_every == 0:  # the model as the steps before left it
                analyses.save(rec, "shattering", _shattering(model, line, step))
            x, y = next(batches)
            if world is not None:
                x, y = distributed.slice_of(x, y, world)
            x, y = _to(x, dev), y.to(dev, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            loss, acc = _backward(net, x, y, accumulate, scaler, amp, amp_dtype)
            rec.step(loss=loss, accuracy=acc)  # this process's share; watch() merges them over the ranks
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            schedule.step()
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                eval_loss, eval_acc = evaluate(net, the_task, dev, limit=eval_limit)  # alike on every rank
                rec.log_eval(loss=eval_loss, accuracy=eval_acc)
                final_acc = float(eval_acc)  # once per evaluation: a sync outside the hot path
            if (step + 1) % max(1, min(every, 10)) == 0 or step + 1 == steps:
                # the global batch's loss, the mean over the processes: one collective, on every rank alike
                shown = loss if world is None else distributed.mean_over_processes(loss)[0]
                if bar is not None:
                    final_loss = float(shown.detach())
                    bar.set_postfix(loss=f"{final_loss:.3f}", eval_acc=f"{final_acc:.3f}",
                                    samples_s=f"{(step + 1) * batch / (time.perf_counter() - start):.0f}",
                                    refresh=False)
                    bar.update((step + 1) - bar.n)
        final_loss = float(shown.detach())
        if checkpoints:
            analyses.save(rec, "shattering", _shattering(model, line, steps))
        if world is None or world.rank == 0:  # while the run is still locked: no other writer between
            save_weights(model, rec.path)
    if bar is not None:
        bar.close()
    return TrainResult(path, steps, time.perf_counter() - start, final_loss, final_acc)


def shattering_line(task: Task, model: nn.Module, name: str) -> tuple[Tensor, Tensor, str | None]:
    """Where the shattering measures are taken: from the first held-out input to the second, and,
    for token ids (no inputs lie between two), in the output space of the first ``nn.Embedding``."""
    inputs = task.test_inputs
    if isinstance(inputs, tuple):
        raise ValueError(f"{name} takes two inputs (source and target): shattering needs a model of one")
    if inputs.is_floating_point():
        return inputs[0], inputs[1], None
    at = next((n for n, m in model.named_modules() if isinstance(m, nn.Embedding)), None)
    if at is None:
        raise ValueError(f"{name} reads token ids but has no nn.Embedding to lay the line in")
    return inputs[0], inputs[1], at


def _shattering(model: nn.Module, line: tuple[Tensor, Tensor, str | None], step: int) -> Any:
    start, end, at = line
    return analyses.shattering(model, start, end, at=at, step=step)


def micro_batches(batch: int, accumulate: int) -> int:
    """Samples per micro-batch of a process's ``batch``, refused unless it splits evenly (so
    that the mean of the micro-batches' mean losses is the batch's)."""
    if batch % accumulate:
        raise ValueError(f"a batch of {batch} samples per process does not split into {accumulate} equal "
                         f"micro-batches: choose a batch size that is a multiple of {accumulate}")
    return batch // accumulate


def _backward(net: nn.Module, x: Any, y: Tensor, accumulate: int, scaler: Any, amp: bool,
              amp_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Forward and backward over ``accumulate`` micro-batches, each loss divided by their number;
    the mean loss and accuracy (device scalars). DDP averages over the processes once, at the last."""
    size = len(y) // accumulate
    loss_sum = acc_sum = torch.zeros((), device=y.device)
    for i in range(accumulate):
        part = slice(i * size, (i + 1) * size)
        xi = tuple(t[part] for t in x) if isinstance(x, tuple) else x[part]
        sync = contextlib.nullcontext() if i == accumulate - 1 or not hasattr(net, "no_sync") else net.no_sync()
        with sync:
            with torch.autocast(y.device.type, dtype=amp_dtype, enabled=amp):
                out = _forward(net, xi)
            loss, acc = loss_and_accuracy(out, y[part])
            share = loss if accumulate == 1 else loss / accumulate
            (scaler.scale(share) if scaler is not None else share).backward()
        if accumulate == 1:
            return loss, acc
        loss_sum, acc_sum = loss_sum + loss.detach(), acc_sum + acc
    return loss_sum / accumulate, acc_sum / accumulate


def _head(inputs: Any, n: int) -> Any:
    return tuple(t[:n] for t in inputs) if isinstance(inputs, tuple) else inputs[:n]


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm  # lazily: the recording core does not need it

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=True)
