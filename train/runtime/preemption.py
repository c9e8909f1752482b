"""Preemption: SIGTERM (scancel, the end of a SLURM time limit, a reclaimed spot node) or SIGUSR1 (SLURM's
`--signal=USR1@<seconds>` warning) during a training stage ends it at the end of the current step, after writing
that step's `last.ckpt`, with `Preempted` (exit code 128 + the signal number). Rerunning the same command resumes
from it and reaches the same weights as an uninterrupted run.

The handler only records the signal; the step in progress finishes (forward, backward, optimizer step; with gradient
accumulation, the whole accumulated step), then every rank agrees (one collective) and saves together, which sharded
strategies need. Installed at `on_fit_start`, so DataLoader workers forked afterwards inherit it and survive a signal
sent to the whole process group (SLURM signals every process of the step); re-installed at `on_train_start` over
Lightning's own SIGTERM handler, whose SIGTERMException would end the run without a checkpoint. Outside `fit` the
previous handlers are back.

The callback also writes `last.ckpt` when training ends between two periodic checkpoints, so a stage stopped later
(during its validation or while saving students) repeats no training steps.

A signal that arrives after the last step, while the fit ends (its final validation, say), has no step left to stop
at: the stage finishes, and the pipeline stops before the next one (`take_late_signal`, train/pipeline.py) instead
of carrying on past a deadline as if nothing had been asked.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import lightning as L

from .faults import Preempted, max_over_ranks, save_last, stage_name, update_done

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_late_signal: int | None = None  # received during a fit that ended before a step could act on it


def take_late_signal() -> int | None:
    """The signal a finished stage received after its last step (then forgotten), or None."""
    global _late_signal
    signum, _late_signal = _late_signal, None
    return signum


class PreemptionCheckpoint(L.Callback):
    def __init__(self) -> None:
        self.received: int | None = None  # the first signal number seen in this fit
        self._previous: dict[int, Any] = {}
        self._pid: int | None = None
        self._active = False
        self._stepped = False

    def _handler(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: the main process decides when everything stops
        if not self._active:  # after fit: behave as before it
            previous = self._previous.get(signum, signal.SIG_DFL)
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        if self.received is None:
            self.received = signum  # no logging here: a handler may interrupt code that holds the logging lock

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            current = signal.getsignal(signum)
            if current != self._handler:
                self._previous.setdefault(signum, current)
            signal.signal(signum, self._handler)

    def _restore(self) -> None:
        self._active = False
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handler and previous is not None:
                signal.signal(signum, previous)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        take_late_signal()  # one left by a stage that failed after its fit belongs to no later fit
        self._pid, self._active, self.received = os.getpid(), True, None
        self._install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self._stepped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._stepped or not update_done(trainer):
            return  # accumulating gradients: they are not in checkpoints, so stop only after the optimizer step
        self._stepped = False
        signum = max_over_ranks(trainer, self.received or 0)  # every rank stops, naming the signal one of them got
        if not signum:
            return
        self.received = None  # acted on here, not late
        name = signal.Signals(signum).name
        log.warning(
            "%s: %s received, writing the checkpoint of step %d", stage_name(trainer), name, trainer.global_step
        )
        path = save_last(trainer)
        # This step's metrics reach the loggers only after on_train_batch_end, which the raise skips: log them here
        # (Lightning's own two calls, in its order), then flush rows still buffered (the CSV writer's 100 steps).
        trainer._logger_connector.on_batch_end()
        trainer._logger_connector.update_train_step_metrics()
        for logger in trainer.loggers:
            logger.save()
        raise Preempted(
            f"{stage_name(trainer)}: stopped by {name} after step {trainer.global_step}; checkpoint {path}. "
            "Rerun the same command to resume",
            signum,
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The final step's state on disk before the stage's post-training work (validation, saving students), so a
        preemption there repeats no training. Lightning's ModelCheckpoint writes last.ckpt at the end only when it
        wrote nothing during this fit, and otherwise only every `checkpoint_every_n_steps`."""
        callback = trainer.checkpoint_callback
        wrote_during_fit = bool(getattr(callback, "_last_checkpoint_saved", ""))
        if wrote_during_fit and getattr(callback, "_last_global_step_saved", -1) != trainer.global_step:
            save_last(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        global _late_signal
        if self._active and self.received is not None and stage == "fit":
            _late_signal = self.received  # the fit ended before a step could stop on it
        self.received = None
        self._restore()
