"""A Hugging Face ``TrainerCallback`` that records the Trainer's model with ``watch()``.

The Trainer clips, then calls ``on_pre_optimizer_step``, then ``optimizer.step()``: the callback
reads the gradients there, after the clip (``max_grad_norm``). The pre-clip norm is the one the
Trainer logs (``grad_norm``, what its clip returned), taken with the loss from its logs, so it
lands on the steps the Trainer logs (``logging_steps``) that gradscope records. Needs
``gradscope[hf]`` (transformers and accelerate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers
from transformers import TrainerCallback

from gradscope.integrations.watch_arguments import checked, with_facts
from gradscope.recording import Recorder, watch


class GradScopeCallback(TrainerCallback):
    """Records ``Trainer(callbacks=[GradScopeCallback(run)])``'s model; ``**watch_kwargs`` go to ``watch()``.

    Attaches at ``on_train_begin`` (the optimizer exists then) and detaches at ``on_train_end``;
    an exception out of ``trainer.train()`` leaves the run to gradscope's exit handler, which marks
    it failed, or call ``close(failed=True)``.
    """

    def __init__(self, run: str | Path | None = None, **watch_kwargs: Any) -> None:
        self.run, self.watch_kwargs = run, checked("GradScopeCallback", watch_kwargs)
        self.recorder: Recorder | None = None
        self._clips = False

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        self.close()  # a second train() call records a run of its own
        self._clips = args.max_grad_norm is not None and args.max_grad_norm > 0
        facts = {"framework": "transformers", "version": transformers.__version__,
                 "gradient_accumulation_steps": args.gradient_accumulation_steps,
                 "max_grad_norm": args.max_grad_norm, "logging_steps": args.logging_steps,
                 "gradients": "after clipping, at on_pre_optimizer_step" if self._clips
                 else "at on_pre_optimizer_step (max_grad_norm=0: no clip)",
                 "loss": "the Trainer's logged loss (its mean since its previous log)"}
        scaler = getattr(optimizer, "scaler", None)  # accelerate's fp16 GradScaler: gradients carry its scale
        self.recorder = watch(model, self.run, optimizer=optimizer, scaler=scaler,
                              **with_facts(self.watch_kwargs, facts))

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.read_gradients(clipped=self._clips)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.recorder is None or not logs:
            return
        if "loss" in logs or "grad_norm" in logs:  # a training log, after the step it closes
            self.recorder.step(loss=logs.get("loss"), grad_norm_pre_clip=logs.get("grad_norm") if self._clips else None)
        if "eval_loss" in logs:
            self.recorder.log_eval(loss=logs["eval_loss"])

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def close(self, *, failed: bool = False) -> None:
        """Detach and write the run (``on_train_end`` does; idempotent)."""
        if self.recorder is not None:
            self.recorder.close(failed=failed)
            self.recorder = None
