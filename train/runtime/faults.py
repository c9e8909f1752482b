"""Failures a long run can meet, as exceptions with one-line messages, and the non-finite loss policy.

`python -m train` turns every `FaultError` into its one-line message and its exit code (docs/reliability.md):
3 for a non-finite loss that stopped a stage, 4 for checkpoint trouble (a failed write, an unreadable or
incompatible checkpoint), 128 + the signal number for a stop on SIGTERM / SIGUSR1 after the checkpoint.

`NonFiniteLossGuard` (a Lightning callback that `train.runtime.trainer.make_trainer` always adds) checks the losses of
an optimizer step and its gradients before the update (one sync per step). A NaN / inf in either drops the update: the
gradients are cleared so AdamW leaves weights and moments untouched (like fp16 loss scaling, the step counter
and the LR schedule still advance). Under DeepSpeed the engine discards steps with non-finite gradients itself
(ZeRO-1/2 bf16 `check_grad_overflow`, ZeRO-3 invalid grad norm, fp16 loss scaling); the guard only counts them.
Policy `faults.nonfinite_loss`: "skip" drops up to `faults.max_skips` updates per stage, "stop" none; past that
the stage writes `last.ckpt` (the weights before the bad update) and raises `NonFiniteLossError`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("skip", "stop")


class FaultError(RuntimeError):
    """A failure with a one-line message for the user; `exit_code` is what `python -m train` exits with."""

    exit_code = 1


class NonFiniteLossError(FaultError):
    exit_code = 3


class CheckpointError(FaultError):
    """A checkpoint could not be written, read, or resumed in this setting."""

    exit_code = 4


class Preempted(FaultError):
    """Stopped on a signal after writing the checkpoint of the current step."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:  # what a shell reports for a process ended by that signal
        return 128 + self.signum


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where the pipeline resumes from: `<ModelCheckpoint dirpath>/last.ckpt`."""
    callback = trainer.checkpoint_callback
    folder = getattr(callback, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
    return Path(folder) / "last.ckpt"


def save_last(trainer: L.Trainer) -> Path:
    """Write `last.ckpt` now (every rank calls it: sharded strategies write their part)."""
    path = last_checkpoint_path(trainer)
    trainer.save_checkpoint(str(path), weights_only=False)  # the full state: model, optimizer, loops, data
    return path


def stage_name(trainer: L.Trainer) -> str:
    """The stage folder's name (ild, kd, ...), for messages."""
    return Path(trainer.default_root_dir).name


def any_rank(trainer: L.Trainer, flag: bool) -> bool:
    """True on every rank when it is true on any (one collective; none on a single process)."""
    if trainer.world_size <= 1:
        return flag
    return bool(trainer.strategy.reduce_boolean_decision(flag, all=False))


def max_over_ranks(trainer: L.Trainer, value: int) -> int:
    """The largest `value` of all ranks, on every rank (one collective; none on a single process)."""
    if trainer.world_size <= 1:
        return value
    tensor = torch.tensor(value, device=trainer.strategy.root_device)
    return int(trainer.strategy.reduce(tensor, reduce_op="max"))


def update_done(trainer: L.Trainer) -> bool:
    """After an optimizer step hook: did the optimizer really update (not a micro-batch of gradient accumulation)?
    Lightning calls the hooks only at accumulation boundaries, except under DeepSpeed, which accumulates inside its
    engine and is asked to step on every micro-batch."""
    engine = getattr(trainer.strategy, "deepspeed_engine", None) if _uses_deepspeed(trainer) else None
    if engine is None:
        return True
    return engine.micro_steps % engine.gradient_accumulation_steps() == 0


def _uses_deepspeed(trainer: L.Trainer) -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(trainer.strategy, DeepSpeedStrategy)


class NonFiniteLossGuard(L.Callback):
    """Drop optimizer updates whose loss or gradients are not finite; stop after `max_skips` (see module doc)."""

    def __init__(self, nonfinite_loss: str = "skip", max_skips: int = 10):
        if nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(f"faults.nonfinite_loss={nonfinite_loss!r} is invalid; allowed: skip | stop")
        self.policy = nonfinite_loss
        self.max_skips = max_skips if nonfinite_loss == "skip" else 0
        self.skipped = 0  # updates dropped in this stage (kept in checkpoints)
        self._losses: list[torch.Tensor] = []  # losses since the last optimizer step (checked there: one sync)
        self._teacher_finite: list[torch.Tensor] = []  # the module's teacher_finite flags of those micro-batches
        self._teacher_bad = False  # a non-finite loss came with non-finite teacher outputs
        self._bad_loss: float | None = None  # the first non-finite one of them
        self._stepped = False  # an optimizer step ended this batch (not one accumulating gradients)
        self._dropped = False  # ... and its update was dropped

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach().float().reshape(-1)[:1])
        flag = getattr(pl_module, "teacher_finite", None)
        if isinstance(flag, torch.Tensor):
            self._teacher_finite.append(flag.reshape(1))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        losses = torch.cat(self._losses) if self._losses else torch.zeros(1)
        finite = torch.isfinite(losses)
        self._bad_loss = None if bool(finite.all()) else float(losses[~finite][0])
        bad = self._bad_loss is not None
        self._teacher_bad = bad and bool(self._teacher_finite) and not bool(torch.cat(self._teacher_finite).all())
        # Gradients are checked where they are plain, unscaled tensors: not under a GradScaler (its inf checks
        # drive the loss scale) nor DeepSpeed (gradients live in the engine's partitions).
        if not bad and not _uses_deepspeed(trainer) and getattr(trainer.precision_plugin, "scaler", None) is None:
            bad = not _finite([p.grad for p in pl_module.parameters() if p.grad is not None])
        self._stepped, self._dropped = True, any_rank(trainer, bad)
        if self._dropped and not _uses_deepspeed(trainer):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # AdamW skips parameters without a gradient: no update, moments untouched

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._stepped or not update_done(trainer):
            return  # accumulating gradients: the decision comes with the optimizer step
        bad_loss, dropped, teacher_bad = self._bad_loss, self._dropped, self._teacher_bad
        self._losses, self._bad_loss, self._stepped, self._dropped = [], None, False, False
        self._teacher_finite, self._teacher_bad = [], False
        if not dropped:
            return
        what = "loss" if bad_loss is not None else "gradient"
        value = f" ({bad_loss})" if bad_loss is not None and not math.isfinite(bad_loss) else ""
        if teacher_bad:
            value += f" from the teacher: {teacher_description(pl_module)} gave non-finite outputs for this batch"
        self.skipped += 1
        stage, step = stage_name(trainer), trainer.global_step
        if self.skipped <= self.max_skips:
            log.warning(
                "%s: non-finite %s%s at step %d: update dropped (%d of faults.max_skips=%d)",
                stage,
                what,
                value,
                step,
                self.skipped,
                self.max_skips,
            )
            pl_module.log("train/nonfinite_skips", float(self.skipped), on_step=True, reduce_fx="max")
            return
        path = save_last(trainer)
        rule = (
            "faults.nonfinite_loss=stop"
            if self.policy == "stop"
            else f"more than faults.max_skips={self.max_skips} dropped updates"
        )
        advice = (
            "check the teacher's weights, or its teacher.dtype (float16 overflows where bfloat16 does not)"
            if teacher_bad
            else "lower the learning rate or check the data"
        )
        raise NonFiniteLossError(
            f"{stage}: non-finite {what}{value} at step {step}; stopped ({rule}). Checkpoint without that update: "
            f"{path}. Rerun the same command to resume after that batch; if it keeps happening, {advice}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


def teacher_description(pl_module: Any) -> str:
    """'the teacher <name_or_path> (<dtype>)' of a distillation module, for messages."""
    teacher = getattr(pl_module, "teacher", None)
    name = getattr(getattr(teacher, "config", None), "_name_or_path", "") or "?"
    return f"the teacher {name} ({str(getattr(teacher, 'dtype', '?')).removeprefix('torch.')})"


def _finite(tensors: list[torch.Tensor]) -> bool:
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
