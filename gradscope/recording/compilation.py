"""Compiled models (``torch.compile``, ``model.compile()``): what gradscope's hooks need there.

Facts (torch 2.13, docs/design.md "Compiled models"): Dynamo traces the module hooks present at
a compiled model's first call into its code and does not guard on them, so hooks added later
never run and nothing warns; removing one makes Dynamo recompile, after which re-added hooks
never run either. Another instance of the same class, compiled and called first, hands its code
(compiled without hooks) to this one too: Dynamo does not guard on hooks
(``torch._dynamo.config.skip_nnmodule_hook_guards``). So once a model is compiled the probes
stay attached (traced, they run every step: ``recording.traced``), and a recorded step whose
watched parameters have gradients while no probe ran is refused with the reason, instead of
recording nothing. A recorder closed on a model that ran compiled removes its hooks, after which
Dynamo compiles the model without them and runs that code for a later recorder's hooks too: the
refusal then names that cause.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

from torch import nn

#: Models whose hooks a closed recorder removed after Dynamo had traced them (``note_unhooked``).
_UNHOOKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def compiled(model: nn.Module) -> bool:
    """Whether ``model`` is compiled already: a ``torch.compile`` wrapper (OptimizedModule), or a
    module compiled in place by ``model.compile()``. Looked up without importing Dynamo."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    optimized: Any = getattr(eval_frame, "OptimizedModule", None)
    return any((optimized is not None and isinstance(m, optimized))
               or getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def note_unhooked(model: nn.Module) -> None:
    """A recorder whose hooks Dynamo traced into ``model`` removes them (it closes)."""
    _UNHOOKED.add(model)


def hooks_never_ran(step: int, path: Any, model: nn.Module) -> str:
    """The refusal when a recorded step trained the watched layers but none of their hooks ran."""
    earlier = ("An earlier gradscope recorder watched this model while it ran compiled. When it closed, its "
               "hooks were removed and Dynamo compiled the model again without hooks; Dynamo runs that code "
               "whatever hooks are added later. Call torch._dynamo.reset() before watch() (every compiled "
               "model then compiles again), or keep one recorder open for the whole training (every= sets "
               "how often it records). ") if model in _UNHOOKED else ""
    return (f"gradscope: in step {step} the watched layers' parameters have gradients, but none of "
            f"gradscope's hooks on them ran. {earlier}The model was most likely compiled (torch.compile or "
            "model.compile()) and called before watch(), or another instance of its class was compiled and "
            "called first: Dynamo does not guard on module hooks, so it runs code compiled without them. "
            "Call gradscope.watch() before any compiled call (or torch._dynamo.reset() before watch()), or set "
            "torch._dynamo.config.skip_nnmodule_hook_guards = False to make Dynamo recompile for hooks. "
            "Hooks also never run for modules called through .forward() instead of module(...). "
            f"The run at {path} is marked failed.")
