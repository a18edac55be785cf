"""Seeded training loops, run with and without a recorder.

Most of what gradscope promises is checked by training the same model on the same data twice
(or with two settings) and comparing what comes out: the parameters, bit for bit, or the
recorded tables. These helpers are that loop, written once, so every such test trains the
same way and a difference can only come from what the test changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradscope.lab import models
from gradscope.recording import Recorder, watch

#: One training example: the model's input (a tensor, or a tuple of them for encoder-decoders)
#: and the integer targets.
Batch = tuple[Any, Tensor]

#: Input sizes that keep every input kind small on a CPU; depth and width come per family.
_SMALL_INPUTS: dict[str, dict[str, Any]] = {
    "image": {"input_size": 8}, "tokens": {"seq_len": 8}, "lm": {"seq_len": 8}, "seq2seq": {"seq_len": 8}}
_SMALL_FAMILIES: dict[str, dict[str, Any]] = {"transformer": {"depth": 2}}


def batches(kind: str, steps: int, seed: int = 0, batch: int = 8, *, size: int = 8,
            device: torch.device | str | None = None) -> list[tuple[Tensor, Tensor]]:
    """``steps`` seeded (x, y) pairs for the tiny models: ``kind="cnn"`` gives images
    ``[batch, 3, size, size]`` (TinyCNN), anything else ``[batch, 8]`` (TinyMLP, TwiceCalled);
    targets are 4 classes. Drawn from their own generator, so the global seed is left alone."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 3, size, size) if kind == "cnn" else (batch, 8)
    return [(torch.randn(shape, generator=g).to(device), torch.randint(0, 4, (batch,), generator=g).to(device))
            for _ in range(steps)]


def reference_batches(name: str, steps: int, batch: int = 8, **overrides: Any) -> list[Batch]:
    """``steps`` inputs for the registered model ``name`` built with ``overrides``, seeded
    0, 1, ..., so two runs of one test see the same data."""
    return [models.example_input(name, batch=batch, seed=i, **overrides) for i in range(steps)]


def small_overrides(name: str, family_sizes: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Overrides that make the registered model ``name`` small enough for a test on a CPU.

    Inputs shrink by the model's input kind (8x8 images, 8 tokens), which every model has;
    ``family_sizes`` (family -> overrides) adds depth, width, ... for the families it names,
    on top of the two-layer transformers used everywhere. A family it does not know keeps its
    default depth rather than being left out. Keys the model does not take are dropped.
    """
    e = models.entry(name)
    wanted = {**_SMALL_INPUTS.get(e.input_kind, {}), **_SMALL_FAMILIES.get(e.family, {}),
              **(family_sizes or {}).get(e.family, {})}
    return {k: v for k, v in wanted.items() if k in e.defaults}


def forward(model: nn.Module, x: Any) -> Tensor:
    """Call ``model`` on one input, unpacking the (source, target) pair of encoder-decoders."""
    return model(*x) if isinstance(x, tuple) else model(x)


def loss_of(out: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy over the last axis: one loss for classifiers ``[batch, classes]`` and
    token models ``[batch, tokens, vocab]`` alike (for the former it is plain cross-entropy)."""
    return F.cross_entropy(out.flatten(0, -2), target.flatten())


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Any, y: Tensor,
               rec: Recorder | None = None) -> Tensor:
    """One optimizer step on (x, y), ending the recorder's step with the loss before the
    optimizer's step (as a training loop that reports its loss does). Returns the loss."""
    opt.zero_grad()
    loss = loss_of(forward(model, x), y)
    loss.backward()
    if rec is not None:
        rec.step(loss=loss)
    opt.step()
    return loss


def train(
    model: nn.Module,
    data: Iterable[Batch],
    *,
    run: Any = None,
    lr: float = 0.05,
    momentum: float | None = None,
    optimizer_cls: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
    call_step: bool = True,
    **watch_kwargs: Any,
) -> Recorder | None:
    """Train ``model`` on ``data``, one optimizer step per batch; record it into ``run`` when
    given (``watch_kwargs`` go to ``gradscope.watch``), and return the closed recorder.

    ``call_step=False`` leaves the steps to the recorder's optimizer hook, as a loop that never
    calls ``rec.step()`` does. ``data`` may be a generator: batches drawn from the global random
    generator are then drawn between the steps, where the test's own loop drew them.
    """
    kwargs: dict[str, Any] = {"lr": lr} if momentum is None else {"lr": lr, "momentum": momentum}
    opt = optimizer_cls(model.parameters(), **kwargs)
    rec = watch(model, run, optimizer=opt, **watch_kwargs) if run is not None else None
    try:
        for x, y in data:
            train_step(model, opt, x, y, rec if call_step else None)
    finally:
        if rec is not None:
            rec.close()
    return rec


def train_reference(name: str, overrides: Mapping[str, Any] | None = None, run: Any = None, steps: int = 20, *,
                    batch: int = 8, lr: float = 0.01, momentum: float = 0.9,
                    **watch_kwargs: Any) -> tuple[nn.Module, Recorder | None]:
    """Build the registered model ``name`` (seed 0) and train it with SGD and momentum on
    ``reference_batches``; recorded into ``run`` when given. Returns the model and recorder."""
    overrides = dict(overrides or {})
    torch.manual_seed(0)
    model = models.create(name, **overrides)
    data = reference_batches(name, steps, batch, **overrides)
    rec = train(model, data, run=run, lr=lr, momentum=momentum, call_step=False, **watch_kwargs)
    return model, rec


def assert_same_parameters(a: nn.Module | Mapping[str, Tensor], b: nn.Module | Mapping[str, Tensor],
                           what: str = "") -> None:
    """Fail unless two models (or state dicts) hold bit-identical parameters and buffers: an
    observer must not change training at all, so there is no tolerance."""
    a_state = a.state_dict() if isinstance(a, nn.Module) else a
    b_state = b.state_dict() if isinstance(b, nn.Module) else b
    prefix = f"{what}: " if what else ""
    if len(a_state) != len(b_state):  # raised, not asserted: still checked under python -O
        raise AssertionError(f"{prefix}{len(a_state)} tensors against {len(b_state)}")
    for (key, x), y in zip(a_state.items(), b_state.values()):
        if not torch.equal(x, y):
            raise AssertionError(f"{prefix}{key} differs")
