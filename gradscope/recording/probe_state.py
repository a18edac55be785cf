"""Running a watched model outside its training step (attribution checkpoints, the analyses).

Inside, the model is in the mode asked for with dropout off (its draws are noise, not the
model's function), autograd is on, autocast is off and the random state is forked, so the
training that follows draws the same numbers; afterwards every module's mode is as it was. A
compiled model runs its Python, not its compiled code: an analysis works through hooks added for
it (Captum's, the lesion's identity), and Dynamo runs code compiled without them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from gradscope.recording.compilation import compiled


@contextlib.contextmanager
def probe_state(model: nn.Module, *, train: bool = False) -> Iterator[None]:
    """``model`` in train (``train=True``, dropout off) or eval mode inside; modes restored after."""
    modes = [(m, m.training) for m in model.modules()]
    devices = sorted({t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.is_cuda})
    device_type = next((p.device.type for p in model.parameters()), "cpu")
    try:
        model.train(train)
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
                torch.autocast(device_type if device_type in ("cuda", "cpu") else "cpu", enabled=False), \
                _uncompiled(model):
            yield
    finally:
        for m, training in modes:
            m.training = training


def _uncompiled(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Compiled code skipped inside (``torch.compiler.set_stance("force_eager")``, torch 2.6+);
    refused on an older torch for a compiled model, whose analysis would miss its hooks."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is not None:
        return set_stance("force_eager")
    if compiled(model):
        raise RuntimeError("gradscope: an analysis or attribution on a compiled model needs torch 2.6 or newer "
                           "(torch.compiler.set_stance), to run the model without the code Dynamo compiled "
                           "before the analysis's hooks existed")
    return contextlib.nullcontext()
