"""Which probe hooks go on which module, attached only for the steps that are recorded.

With ``every > 1`` the module probes are registered when a recorded step begins and removed when
it ends, so the other steps run no gradscope code but the recorder's one pre-hook on the model.
A probe pre-hook on the model itself cannot be attached from the model's pre-hook, so such
probes (and every probe with ``every=1``) stay attached throughout, and so do all of them once
the model is compiled (``pin``): a compiled model never runs hooks attached after its first call.

Probes are registered ahead of every other hook of their module (``prepend=True``): attached
for each recorded step, they would otherwise run after the user's hooks registered since
``watch()`` on some steps and before them on others. So a probe always sees the module's input
as its caller passed it and its output as its forward returned it, whatever the user's hooks
change next.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gradscope.recording.blocks import Block
from gradscope.recording.clock import StepClock
from gradscope.recording.copies import MethodHook
from gradscope.recording.layers import ExecutionOrder, Layer, ParameterRow
from gradscope.recording.probes import BlockEntry, BlockProbe, BranchProbe, LayerProbe, sequential_tail
from gradscope.recording.sink import Sink
from gradscope.recording.traced import Staging


class ProbeHooks:
    """The probes of one recorder and their hook handles."""

    def __init__(self, model: nn.Module, clock: StepClock, sink: Sink,
                 layers: list[tuple[Layer, nn.Module | ParameterRow]], layer_order: ExecutionOrder,
                 blocks: list[tuple[Block, nn.Module, nn.Module | None]], block_order: ExecutionOrder,
                 staging: Staging) -> None:
        self.planned: list[tuple[nn.Module, str, Any]] = []  # (module, "pre" or "forward", probe)
        layer_probes: dict[int, tuple[nn.Module, LayerProbe]] = {}
        for layer, module in layers:
            if isinstance(module, ParameterRow):  # norms only, written at the step's end
                continue
            probe = LayerProbe(clock, sink, layer_order, layer.row, layer.saturation_bounds, layer.zero_counted,
                               staging)
            layer_probes[id(module)] = (module, probe)
            self.planned.append((module, "forward", probe))
        for block, module, branch in blocks:
            block_probe = BlockProbe(clock, sink, block_order, block, module, staging)
            self.planned += [(module, "pre", BlockEntry(block_probe)), (module, "forward", block_probe)]
            if branch is not None:
                last = sequential_tail(branch)  # a watched last layer measures ||F(x)||^2 for the branch
                tail = layer_probes.get(id(last)) if last is not None else None
                if tail is not None:
                    tail[1].feeds_branch = True
                self.planned.append((branch, "forward", BranchProbe(clock, sink, block.row, staging, tail)))
        self.always = clock.every == 1 or any(m is model and kind == "pre" for m, kind, _ in self.planned)
        self.handles: list[Any] = []

    def pin(self) -> None:
        """Keep the probes attached from now on: the model is compiled, and Dynamo never runs hooks
        added after its first call (``recording.compilation``). Eager calls test the schedule;
        traced ones run every step, into the staging (``recording.traced``)."""
        self.always = True
        self.sync(True)

    def sync(self, recording: bool) -> None:
        """Attach the probes for a recorded step, detach them for the others."""
        want = recording or self.always
        if want and not self.handles:
            # each prepended ahead of the ones after it in the plan, so the plan's order holds
            for module, kind, probe in reversed(self.planned):
                register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
                self.handles.append(register(probe, prepend=True))
        elif not want and self.handles:
            self.remove()

    def remove(self) -> None:
        handles, self.handles = self.handles, []
        for handle in handles:
            handle.remove()


class ModelStart(MethodHook):
    """The recorder's forward pre-hook on the whole model (``Recorder._model_pre_hook``)."""

    __slots__ = ()

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.method(module, args)


class ModelEnd(MethodHook):
    """The recorder's forward hook on the whole model (``Recorder._model_forward_end``)."""

    __slots__ = ()

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.method(module, args, output)
