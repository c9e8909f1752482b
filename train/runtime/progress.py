"""The training progress bar: a stage's optimizer steps against its `max_steps`, continued after a resume.

Lightning's own bars count batches of an epoch and epochs out of `max_epochs`; our stages are bounded by steps over
an endless stream, so they showed `Epoch 0/-2` and, after a resume, `60/43`. This bar shows `ild: 60/100`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """Optimizer steps of one stage (`trainer.global_step` of `trainer.max_steps`), described by the stage's name."""

    def __init__(self, stage: str, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.stage = stage

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        self._show_steps(trainer)  # Lightning skips on_train_epoch_start when it resumes mid-epoch

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        self._show_steps(trainer)

    def _show_steps(self, trainer: L.Trainer) -> None:
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        # A resumed stage starts where its checkpoint stopped; `initial` keeps the rate to the steps run here.
        bar.initial = bar.n = trainer.global_step
        bar.set_description(self.stage)
        if not bar.disable:
            bar.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar.n != step and self._should_update(step, bar.total) and not bar.disable:
            bar.n = step  # steps, not batches: under gradient accumulation several batches make one step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()
