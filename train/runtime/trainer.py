"""A Lightning Trainer from the `trainer`, `strategy` and `logger` config groups, for one stage folder.

Every trainer gets the fault handling of docs/reliability.md: atomic checkpoint writes and safe reads
(`AtomicCheckpointIO`, or DeepSpeed's own writer with the resume check), the non-finite loss policy
(`NonFiniteLossGuard`, from the `faults` config group), a checkpoint on SIGTERM / SIGUSR1
(`PreemptionCheckpoint`) and a progress bar of the stage's steps (`StepProgressBar`). A callback of the same kind
in `extra_callbacks` replaces the default one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from .checkpoint_io import AtomicCheckpointIO
from .csv_log import ResumableCSVLogger
from .deepspeed_strategy import make_deepspeed_strategy
from .faults import NonFiniteLossGuard
from .preemption import PreemptionCheckpoint
from .progress import StepProgressBar
from .sdpa_report import SDPAKernelReport


def make_strategy(strategy: dict) -> Any:
    name = strategy.get("name", "auto")
    settings = {k: v for k, v in strategy.items() if k != "name"}
    if name == "auto":
        return name
    if name in ("ddp", "ddp_spawn"):  # ddp_spawn: processes started by torch.multiprocessing (tests, notebooks)
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(start_method="spawn" if name == "ddp_spawn" else "popen", **settings)
    if name.startswith("deepspeed"):
        return make_deepspeed_strategy(**settings)
    raise ValueError(f"strategy.name={name!r} is invalid: auto, ddp, ddp_spawn or deepspeed_*")


def make_logger(logger: dict, stage_dir: Path, run_name: str) -> Any:
    """The Lightning logger(s) of one stage: `stage_dir` is `<output_dir>/<stage>`.

    csv: `<stage>/logs/metrics.csv`. wandb: the pipeline's one W&B run (train/runtime/tracking.py), metrics under
    `<stage>/...`, plus the same CSV (the loss-curve plot reads it). none: no logger.
    """
    kind = logger.get("kind", "csv")
    if kind == "none":
        return False
    csv = ResumableCSVLogger(save_dir=str(stage_dir), name="logs", version="")
    if kind == "csv":
        return csv
    if kind == "wandb":
        from .tracking import StageWandbLogger  # wandb is imported only when this logger is chosen

        return [csv, StageWandbLogger(stage_dir.name, logger, stage_dir.parent, run_name)]
    raise ValueError(f"logger.kind={kind!r} is invalid: csv, wandb or none")


def make_trainer(
    trainer_cfg: dict,
    strategy: dict,
    logger: dict,
    stage_dir: Path,
    run_name: str,
    max_steps: int,
    val_every: int,
    checkpoint_every: int,
    limit_val_batches: int | None,
    extra_callbacks: list | None = None,
    faults: dict | None = None,
) -> tuple[L.Trainer, ModelCheckpoint]:
    """`faults`: the `faults` config group (nonfinite_loss, max_skips); None: its defaults."""
    checkpoint = ModelCheckpoint(
        dirpath=str(stage_dir / "checkpoints"),
        every_n_train_steps=checkpoint_every,
        save_last=True,
        save_top_k=1,
        monitor=None,
        # Overwrite, never version: a resumed stage must keep writing last.ckpt (the file it resumes from), even
        # when last.ckpt came from a save outside ModelCheckpoint (preemption, non-finite stop) or an earlier process.
        enable_version_counter=False,
    )
    args = {k: v for k, v in trainer_cfg.items() if k not in ("gradient_checkpointing", "device_memory_gib")}
    extra = list(extra_callbacks or [])
    defaults = [NonFiniteLossGuard(**(faults or {})), PreemptionCheckpoint(), SDPAKernelReport()]
    if args.get("enable_progress_bar", True):
        defaults.append(StepProgressBar(stage_dir.name))
    extra += [d for d in defaults if not any(isinstance(c, type(d)) for c in extra)]
    trainer = L.Trainer(
        default_root_dir=str(stage_dir),
        max_steps=max_steps,
        val_check_interval=min(val_every, max_steps),
        check_val_every_n_epoch=None,
        limit_val_batches=limit_val_batches,
        num_sanity_val_steps=0,
        strategy=make_strategy(strategy),
        logger=make_logger(logger, stage_dir, run_name),
        callbacks=[checkpoint, *extra],
        # DeepSpeed writes its own sharded checkpoints; every other strategy goes through the atomic writer.
        plugins=[] if str(strategy.get("name", "")).startswith("deepspeed") else [AtomicCheckpointIO()],
        **args,
    )
    return trainer, checkpoint
