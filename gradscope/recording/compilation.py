"""Compiled models (``torch.compile``, ``model.compile()``): what gradscope's hooks need there.

Facts (torch 2.13, docs/design.md "Compiled models"): Dynamo traces the module hooks present at
a compiled model's first call into its code and does not guard on them, so hooks added later
never run and nothing warns; removing one makes Dynamo recompile, after which re-added hooks
never run either. Another instance of the same class, compiled and called first, hands its code
(compiled without hooks) to this one too: Dynamo does not guard on hooks
(``torch._dynamo.config.skip_nnmodule_hook_guards``). So once a model is compiled the probes
stay attached (traced, they run every step: ``recording.traced``), and a recorded step whose
watched parameters have gradients while no probe ran is refused with the reason, instead of
recording nothing (after hooks have run once, only in a compiled model). Where Dynamo enters a
hook from code it runs as Python, the hook runs as Python too (``python_when_entered``). A
recorder closed on a model that ran compiled removes its hooks, after which Dynamo compiles the
model without them and runs that code for a later recorder's hooks too: the refusal then names
that cause. Where only some layers' hooks never run (a part of the model
compiled on its own on a step the schedule skipped, when the probes were detached), the step is
kept and a warning names those layers. Where ``watch()`` was given a ``torch.compile`` wrapper,
its own hooks, which run eagerly around the compiled call, see a training forward that ran code
compiled without the model's hooks in any step (``WrapperForwards``).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from gradscope.recording.copies import MethodHook
from gradscope.recording.user_warnings import warn_user


def _skip_recursively() -> Any:
    """Dynamo's per-code strategy "run this frame and every frame it calls as Python" (torch 2.6+,
    private), or None."""
    try:
        from torch._C._dynamo.eval_frame import _FrameAction, _FrameExecStrategy, set_code_exec_strategy

        return set_code_exec_strategy, _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.SKIP)
    except Exception:  # (private: renamed or changed in another torch, hooks compile as before)
        return None


_SKIP_RECURSIVELY = _skip_recursively()
F = TypeVar("F", bound=Callable[..., Any])


def python_when_entered(hook: F) -> F:
    """Mark ``hook``, a function PyTorch calls (a module or autograd hook), so that Dynamo runs it and
    all it calls as Python where it is entered from code Dynamo runs uncompiled: inside a compiled
    model, a part Dynamo cannot trace (an ``nn.LSTM``) or a function it gave up on. Dynamo would
    compile it there as a frame of its own, once per probe (its guards hold the probe) up to its
    recompile limit, and the eager path's callees once per step, with warnings naming gradscope
    (torch 2.13: a model with an LSTM compiled 23 graphs watched against none unwatched). Where
    Dynamo traces the module that calls the hook, it still inlines it (``recording.traced``)."""
    if _SKIP_RECURSIVELY is not None:
        set_strategy, strategy = _SKIP_RECURSIVELY
        set_strategy(hook.__code__, strategy)
    return hook


#: Models whose hooks a closed recorder removed after Dynamo had traced them (``note_unhooked``).
_UNHOOKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def compiled(model: nn.Module) -> bool:
    """Whether ``model`` is compiled already: a ``torch.compile`` wrapper (OptimizedModule), or a
    module compiled in place by ``model.compile()``. Looked up without importing Dynamo."""
    return next(_compiled_parts(model), None) is not None


def _compiled_parts(model: nn.Module) -> Iterator[nn.Module]:
    """The modules of ``model`` (itself included) that are compiled: wrappers, in-place ones, and
    ones whose ``forward`` was replaced by a compiled function."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    optimized: Any = getattr(eval_frame, "OptimizedModule", None)
    return (m for m in model.modules() if (optimized is not None and isinstance(m, optimized))
            or getattr(m, "_compiled_call_impl", None) is not None
            or hasattr(vars(m).get("forward"), "_torchdynamo_orig_callable"))  # m.forward = torch.compile(...)


def _compiled_modules(model: nn.Module) -> set[int]:
    """The ids of the modules inside compiled parts of ``model``."""
    return {id(m) for part in _compiled_parts(model) for m in part.modules()}


def note_unhooked(model: nn.Module) -> None:
    """A recorder whose hooks Dynamo traced into ``model`` removes them (it closes)."""
    _UNHOOKED.add(model)


def hooks_never_ran(step: int, path: Any, model: nn.Module, hookless_forward: bool = False) -> str:
    """The refusal when a recorded step trained the watched layers but none of their hooks ran, or
    (``hookless_forward``) one of its forwards ran code compiled without them."""
    earlier = ("An earlier gradscope recorder watched this model while it ran compiled. When it closed, its "
               "hooks were removed and Dynamo compiled the model again without hooks; Dynamo runs that code "
               "whatever hooks are added later. Call torch._dynamo.reset() before watch() (every compiled "
               "model then compiles again), or keep one recorder open for the whole training (every= sets "
               "how often it records). ") if model in _UNHOOKED else ""
    if hookless_forward:
        return (f"gradscope: in step {step} a training forward of the compiled model ran code that has none of "
                "gradscope's hooks, so that forward was not measured. " + (earlier or "The model (or another "
                "instance of its class) was compiled (torch.compile) and called before watch(). ") + "Dynamo keeps "
                "code compiled without the hooks and runs it for the shapes it was compiled for, even after a new "
                "shape compiled code with them, because it does not guard on module hooks. Call "
                "gradscope.watch() before the model's first compiled call (or "
                "torch._dynamo.reset() before watch()), or set torch._dynamo.config.skip_nnmodule_hook_guards = "
                "False to make Dynamo recompile for hooks. (Or the forward called none of the model's modules, "
                "using their parameters directly: gradscope measures nothing of such a forward; call the modules.) "
                f"The run at {path} is marked failed.")
    return (f"gradscope: in step {step} the watched layers' parameters have gradients, but none of "
            f"gradscope's hooks on them ran. {earlier}The model was most likely compiled (torch.compile or "
            "model.compile()) and called before watch(), or compiled on a step the schedule did not record "
            "(every > 1, when gradscope's hooks are detached), or another instance of its class was compiled "
            "and called first: Dynamo does not guard on module hooks, so it runs code compiled without them. "
            "Call gradscope.watch() before any compiled call (or torch._dynamo.reset() before watch()), or set "
            "torch._dynamo.config.skip_nnmodule_hook_guards = False to make Dynamo recompile for hooks. "
            "Hooks also never run for modules called through .forward() instead of module(...). "
            f"The run at {path} is marked failed.")


class HookCheck:
    """Whether the watched layers' probes ran in a recorded step, read from the host's counts (only
    while nothing was traced: a traced probe's counts stay on the device until a flush).

    A training step whose watched parameters have gradients while no probe ran is refused
    (``hooks_never_ran``). Layers whose probes did not run while others' did are named in a
    warning, once, if they lie inside a compiled module: elsewhere that is ordinary (a
    ``MultiheadAttention`` uses its ``out_proj``'s weight without calling it; DDP hands a layer
    unused on this rank the gradient of the others), so those are noted and not looked up again.
    """

    def __init__(self, probed: np.ndarray, modules: list[Any], names: list[str]) -> None:
        self.probed = probed  # rows with module hooks (a ParameterRow has none)
        self.modules, self.names = modules, names
        self.hooks_ran = False
        self.explained = np.zeros_like(probed)  # not run, outside any compiled module: ordinary
        self.warned = False

    def refusal(self, counts: Any, slot: int, staging: Any, clock: Any, path: Any, model: nn.Module) -> str | None:
        """The reason to refuse this recorded step, or None (after a warning, if one is due). A probe
        traced into a compiled graph counts as run: it runs in every call of that graph, its counts
        on the device (``staging.traced_layers``, ``traced_blocks``). ``clock.compiled_forward``:
        the step's training forward ran in a compiled graph (the model's pre-hook was traced);
        ``clock.hookless_forward``: one ran code compiled without it (``WrapperForwards``)."""
        step, compiled_forward, forward_seen = clock.step, clock.compiled_forward, clock.grad_forward_seen
        trained = counts.grad_rows[slot] & self.probed
        if clock.hookless_forward and trained.any():  # whatever else ran: that forward's figures are missing
            return hooks_never_ran(step, path, model, hookless_forward=True)
        ran = counts.act_calls[slot].any(axis=0) | (counts.grad_calls[slot] > 0) | staging.traced_layers
        if not ran.any() and not counts.block_calls[slot].any() and not staging.traced_blocks.any():
            # Once hooks have run, a step that ran none is refused only where its training forward ran
            # compiled (a traced pre-hook) or a watched layer lies in a compiled module: otherwise the
            # watched layers ran eagerly or not at all, unused in this step while their gradients stay
            # (zero_grad(set_to_none=False), DDP handing a rank the others' gradients); and a step
            # without a training forward is a second step() call.
            due = not self.hooks_ran or (forward_seen and (compiled_forward or self._compiled_watched(model)))
            return hooks_never_ran(step, path, model) if trained.any() and due else None
        self.hooks_ran = True
        unexplained = trained & ~ran & ~self.explained
        if self.warned or not unexplained.any():
            return None
        inside = np.zeros_like(unexplained)
        compiled_modules = _compiled_modules(model)
        inside[[row for row in np.flatnonzero(unexplained) if id(self.modules[row]) in compiled_modules]] = True
        self.explained |= unexplained & ~inside
        if inside.any():
            self.warned = True
            missing = [self.names[row] for row in np.flatnonzero(inside)]
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            warn_user(
                f"gradscope: in step {step} gradscope's hooks did not run on {len(missing)} watched layer(s) inside "
                f"compiled modules, while those on other layers did: {shown}. Their rows hold parameter norms "
                "only. Dynamo runs code compiled without the hooks: these modules were compiled and called before "
                "watch(), or compiled on a step the schedule did not record (every > 1, when gradscope's hooks are "
                "detached). Call watch() before their first compiled call (or torch._dynamo.reset() before "
                "watch()), and compile before the first step.")
        return None

    def _compiled_watched(self, model: nn.Module) -> bool:
        """Whether a watched layer with hooks lies inside a compiled module (the model included)."""
        inside = _compiled_modules(model)
        return bool(inside) and any(id(m) in inside for m, hooked in zip(self.modules, self.probed) if hooked)


class WrapperForwards:
    """Training forwards of a compiled model that ran code compiled without gradscope's hooks, seen
    from the ``torch.compile`` wrapper given to ``watch()`` (alone or inside DDP).

    Dynamo's code for a model compiled and called before ``watch()`` stays in its cache: a new shape
    or grad mode traces a graph with the hooks, while the old graph still serves the shapes it was
    compiled for, and its steps would record nothing beside steps that did (a dynamic batch, then
    one of 1, specialised). The wrapper's own hooks run eagerly around the compiled call. A
    pre-hook on each module inside the compiled one is traced into the forward's graph, and Dynamo
    replays its write of ``pending`` after the graph, on every call; so a forward that ends with
    ``pending`` still set ran code compiled without those hooks, and the step is refused. Not on
    the compiled module itself: for a class with a ``forward`` of its own, Dynamo runs that
    module's hooks outside the forward's frame (compiled on their own), whatever graph then runs.
    A model without modules inside is hooked itself: a ``torch.nn`` one is inlined, and one with a
    ``forward`` of its own is then not checked. A model compiled in place (``model.compile()``)
    has no wrapper: its compiled call is wrapped instead (``AroundCompiledCall``); Dynamo then
    compiles only a ``forward`` of the model's own class (a bare ``torch.nn`` model runs eagerly).
    A forward that calls none of the modules inside (it uses their parameters directly) is
    refused too: no gradscope hook ran in it either, and the message names that cause."""

    def __init__(self, wrapped: nn.Module, clock: Any) -> None:
        self.pending = False
        self.clock = clock
        self.handles: list[Any] = []
        outer, in_place, inner = _compiled_entry(wrapped)
        if outer is None and in_place is None:
            return
        try:
            if outer is not None:
                self.handles.append(outer.register_forward_pre_hook(_WrapperEntered(self._before)))
                self.handles.append(outer.register_forward_hook(_WrapperLeft(self._after)))
            else:
                self.handles.append(AroundCompiledCall(in_place, self._before, self._after))
            inside = list(inner.modules())[1:] or [inner]  # a leaf model (nn.Linear): Dynamo inlines its hooks
            entered = _ModuleEntered(self._entered)  # (objects, not bound methods: ``copies``)
            for m in inside:
                self.handles.append(m.register_forward_pre_hook(entered))
        except BaseException:  # nothing of it left on the model
            for handle in self.handles:
                handle.remove()
            raise

    def _before(self, module: nn.Module, args: Any) -> None:
        if not torch.compiler.is_compiling():  # (a compiled function calling the wrapper: not checked)
            self.pending = torch.is_grad_enabled() and not self.clock.held

    def _entered(self, module: nn.Module, args: Any) -> None:
        self.pending = False  # a constant written: traced, no guard

    def _after(self, module: nn.Module, args: Any, output: Any) -> None:
        if not torch.compiler.is_compiling() and self.pending:
            self.clock.hookless_forward = True
        self.pending = False


class _WrapperEntered(MethodHook):
    __slots__ = ()

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.method(module, args)


class _WrapperLeft(MethodHook):
    __slots__ = ()

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.method(module, args, output)


class _ModuleEntered(MethodHook):
    __slots__ = ()

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.method(module, args)


class AroundCompiledCall:
    """``before`` and ``after`` run eagerly around the compiled call of a module compiled in place
    (``model.compile()`` sets ``_compiled_call_impl``, which ``module(...)`` calls instead of its
    hooks and forward); ``remove()`` puts the compiled call back, as a hook handle does, or where
    another call has wrapped this one since (a second recorder), makes this one pass calls through."""

    def __init__(self, module: nn.Module, before: Callable[..., None], after: Callable[..., None]) -> None:
        self.module, self.compiled_call = module, module._compiled_call_impl
        self.active = True
        compiled_call = self.compiled_call

        def call(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return compiled_call(*args, **kwargs)
            before(module, args)
            output = compiled_call(*args, **kwargs)
            after(module, args, output)
            return output

        call.around = self  # type: ignore[attr-defined]
        self.call = call
        module._compiled_call_impl = call

    def remove(self) -> None:
        self.active = False
        if self.module._compiled_call_impl is self.call:  # (else compiled again, or wrapped again: that stays)
            inner = self.compiled_call
            while getattr(inner, "around", None) is not None and not inner.around.active:  # removed before
                inner = inner.around.compiled_call
            self.module._compiled_call_impl = inner


def _compiled_entry(wrapped: nn.Module) -> tuple[nn.Module | None, nn.Module | None, nn.Module]:
    """Where a call to ``wrapped`` enters compiled code, through DDP: the outermost ``torch.compile``
    wrapper (OptimizedModule), else the first module compiled in place (``model.compile()``), and
    the module compiled (the innermost one the call reaches; ``wrapped`` where neither is found)."""
    from torch.nn.parallel import DistributedDataParallel

    optimized: Any = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    chain, m = [], wrapped  # the modules a call goes through
    while True:
        chain.append(m)
        if optimized is not None and isinstance(m, optimized):
            m = m._orig_mod
        elif isinstance(m, DistributedDataParallel):
            m = m.module
        else:
            break
    outer = next((m for m in chain if optimized is not None and isinstance(m, optimized)), None)
    if outer is not None:
        return outer, None, chain[-1]
    in_place = next((m for m in chain if m._compiled_call_impl is not None), None)
    return None, in_place, in_place if in_place is not None else wrapped
