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
refusal then names that cause. Where only some layers' hooks never run (a part of the model
compiled on its own on a step the schedule skipped, when the probes were detached), the step is
kept and a warning names those layers.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import numpy as np
from torch import nn

from gradscope.recording.user_warnings import warn_user

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


class HookCheck:
    """Whether the watched layers' probes ran in a recorded step, read from the host's counts.

    A step whose watched parameters have gradients while no probe ran is refused
    (``hooks_never_ran``); checked until some probe has run. After that, while every probe runs
    eagerly (nothing was traced: the counts are all on the host), layers with gradients whose
    probes did not run while others' did are named in a warning, once.
    """

    def __init__(self, probed: np.ndarray, names: list[str]) -> None:
        self.probed = probed  # rows with module hooks (a ParameterRow has none)
        self.names = names
        self.hooks_ran = False
        self.warned = False

    def refusal(self, counts: Any, slot: int, traced: bool, step: int, path: Any, model: nn.Module) -> str | None:
        """The reason to refuse this recorded step, or None (after a warning, if one is due)."""
        if self.hooks_ran and (traced or self.warned):
            return None
        ran = counts.act_calls[slot].any(axis=0) | (counts.grad_calls[slot] > 0)
        trained = counts.grad_rows[slot] & self.probed
        if not self.hooks_ran:
            if traced or ran.any() or counts.block_calls[slot].any():
                self.hooks_ran = True
            elif trained.any():
                return hooks_never_ran(step, path, model)
        elif (trained & ~ran).any():
            self.warned = True
            missing = [self.names[row] for row in np.flatnonzero(trained & ~ran)]
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            warn_user(
                f"gradscope: in step {step} the parameters of {len(missing)} watched layer(s) have gradients, but "
                f"gradscope's hooks on them did not run, while those on other layers did: {shown}. Their rows "
                "hold parameter norms only. Most likely these modules were compiled on their own "
                "(torch.compile(layer), layer.compile()) after watch(), on a step the schedule did not record: "
                "Dynamo runs code compiled without hooks. Compile them before watch() or before the first step, "
                "or use every=1. Hooks also never run for modules called through .forward(), and a layer that "
                "did not run in this step keeps an earlier step's gradient under zero_grad(set_to_none=False).")
        return None
