"""A Lightning ``Callback`` that records a ``LightningModule``'s gradient flow with ``watch()``.

Lightning runs the forward and backward inside ``optimizer.step(closure)``, so the optimizer's
step pre-hook comes before the gradients exist; the callback reads them where Lightning hands
them out instead: ``on_before_optimizer_step``, unscaled (16-bit AMP) and before the clip. The
optimizer's step then adds the post-clip global norm. Gradient accumulation merges its
micro-batches into one step, as the optimizer steps once for them.

Imports ``lightning.pytorch`` where installed, else ``pytorch_lightning`` (``gradscope[lightning]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradscope.integrations.watch_arguments import checked, with_facts
from gradscope.recording import Recorder, watch

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl


class GradScope(pl.Callback):
    """Records the fitted ``LightningModule`` into the run ``run``; ``**watch_kwargs`` go to ``watch()``.

    It attaches when fitting starts (after ``configure_model`` and ``configure_optimizers``, so
    the modules and the optimizer exist) and detaches at ``teardown``, or at ``on_exception``
    with the run marked failed or interrupted. Under Lightning's DDP strategy every rank takes
    part and rank 0 writes the merged run.
    """

    def __init__(self, run: str | Path | None = None, **watch_kwargs: Any) -> None:
        self.run, self.watch_kwargs = run, checked("GradScope", watch_kwargs)
        self.recorder: Recorder | None = None
        self._loss: Any = None  # the micro-batch losses of the step in progress (Lightning divides each)
        self._steps_seen = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"GradScope: the LightningModule has {len(trainer.optimizers)} optimizers; "
                             "gradscope marks steps by one optimizer's steps")
        facts = {"framework": "lightning", "version": pl.__version__, "precision": str(trainer.precision),
                 "accumulate_grad_batches": trainer.accumulate_grad_batches,
                 "gradient_clip_val": trainer.gradient_clip_val,
                 "gradients": "unscaled, before clipping: as Lightning passes them to on_before_optimizer_step"}
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # 16-mixed: gradients carry its scale
        self.recorder = watch(pl_module, self.run, optimizer=trainer.optimizers[0], scaler=scaler,
                              **with_facts(self.watch_kwargs, facts))
        self._loss, self._steps_seen = None, trainer.global_step

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.recorder is not None:
            self.recorder.read_gradients(clipped=False)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.recorder is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and hasattr(loss, "detach"):
            self._loss = loss.detach() if self._loss is None else self._loss + loss.detach()  # on the device
        if trainer.global_step != self._steps_seen:  # the optimizer stepped: that step's loss
            self._steps_seen = trainer.global_step
            self.recorder.step(loss=self._loss)
            self._loss = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.recorder is not None:  # Lightning skips teardown after an exception
            self.recorder.__exit__(type(exception), exception, exception.__traceback__)
            self.recorder = None
