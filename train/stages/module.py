"""What the ILD and KD LightningModules share: a frozen teacher kept out of the optimizer and out of
checkpoints (replicated, or partitioned over the ranks with `teacher.shard`), AdamW with warmup + cosine, and
token/throughput accounting."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import lightning as L
import torch
from transformers import PreTrainedModel

from models.flops import attention_context
from models.teachers import TeacherTrace, adapter_for
from train.config import ConfigError
from train.runtime.deepspeed_strategy import is_deepspeed, offloads_optimizer
from train.runtime.optim import adamw_cosine
from train.runtime.sharded_teacher import gathered, shard_teacher, teacher_outputs


class DistillModule(L.LightningModule):
    def __init__(self, teacher: PreTrainedModel | None, optim: dict):
        super().__init__()
        # Not registered as a submodule: never in state_dict (checkpoints) nor in parameters() (optimizer). None:
        # KD from a teacher cache (train/runtime/teacher_cache.py), no teacher weights loaded.
        object.__setattr__(self, "teacher", None if teacher is None else teacher.eval().requires_grad_(False))
        # teacher.shard (set by the stage): partition the teacher over the ranks at fit start (ZeRO-3 only); the
        # engine its passes then go through is kept here, outside the module tree as the teacher is.
        self.shard_teacher = False
        object.__setattr__(self, "teacher_engine", None)
        self.optim = dict(optim)
        self.tokens_seen = 0
        self._step_start: float | None = None  # when the current training step's batch arrived
        self._step_work = (0, 0)  # (tokens over all ranks, model FLOPs per rank) of the current step
        self._last_step: tuple[int, int, float] | None = None  # (tokens, FLOPs, wall seconds) of the previous step
        # Whether the teacher's outputs of the current batch were finite: a device tensor (no host sync), read by
        # the non-finite loss guard only when a loss is not finite, to tell a broken teacher from the student.
        self.teacher_finite: torch.Tensor | None = None

    def note_teacher_outputs(self, hidden: torch.Tensor) -> torch.Tensor:
        self.teacher_finite = torch.isfinite(hidden).all()
        return hidden

    def on_fit_start(self) -> None:
        # Here the process group and the training engine exist (Lightning's strategy.setup), so every rank
        # partitions the teacher it loaded whole on the host; its slices land on this rank's device.
        if self.teacher is not None and self.shard_teacher and self.teacher_engine is None:
            strategy = self.trainer.strategy
            if not (is_deepspeed(strategy) and strategy.zero_stage_3):  # validate_config refuses it first
                raise ConfigError(f"teacher.shard=True is invalid; allowed: false with {type(strategy).__name__}")
            object.__setattr__(self, "teacher_engine", shard_teacher(self.teacher, strategy.config))
        self._teacher_to_device()
        self.train()  # students come from from_pretrained in eval mode; the frozen model is not a submodule

    def on_validation_start(self) -> None:
        self._teacher_to_device()

    def _teacher_to_device(self) -> None:
        if self.teacher is not None and self.teacher_engine is None:  # partitions are placed by DeepSpeed
            self.teacher.to(self.device)

    def teacher_pass(self, batch: dict[str, torch.Tensor], trace: bool = False) -> torch.Tensor | TeacherTrace:
        """The teacher's final hidden states (B, T, D), or with `trace` ILD's per-layer trace, without gradients;
        through the ZeRO-3 engine when the teacher is partitioned (its root forward resets the gather schedule)."""
        with torch.no_grad():
            if self.teacher_engine is not None:
                return self.teacher_engine(batch, trace=trace)
            return teacher_outputs(self.teacher, batch, trace)

    @contextlib.contextmanager
    def teacher_head(self) -> Iterator[torch.Tensor]:
        """The teacher's lm_head weight (V, D), whole inside the block: a partitioned one is gathered on every rank
        (read outside the teacher's forward, ZeRO-3 would see only its empty placeholder)."""
        weight = adapter_for(self.teacher).lm_head(self.teacher).weight
        with gathered(weight):
            yield weight

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> dict:
        o = self.optim
        return adamw_cosine(
            self.trainable_parameters(),
            o["lr"],
            o["weight_decay"],
            o["warmup_steps"],
            o["max_steps"],
            o["min_lr_ratio"],
            cpu_offload=offloads_optimizer(self.trainer.strategy),
        )

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # A step's wall time is from its batch's arrival to the next one's: forward, backward, optimizer step and
        # the wait for data. Timing inside training_step would see the forward only (and, CUDA being
        # asynchronous, not even all of it).
        now = time.perf_counter()
        if self._step_start is not None and self._step_work[0]:
            self._last_step = (*self._step_work, now - self._step_start)
        self._step_start = now

    def flops_per_token(self, context: float) -> int:
        """Model FLOPs of one training step per token (models/flops.py); subclasses say what they train."""
        raise NotImplementedError

    def _peak_flops(self) -> float | None:
        """The device's peak FLOP/s at the training precision (Lightning's table of known cards), None if unknown."""
        if not hasattr(self, "_peak"):
            from lightning.fabric.utilities.throughput import get_available_flops

            precision = str(self.trainer.precision)
            dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision else torch.float32
            self._peak = get_available_flops(self.device, dtype) if self.device.type == "cuda" else None
        return self._peak

    def log_throughput(self, batch: dict[str, torch.Tensor]) -> None:
        """tokens seen, tokens/s (all ranks), lr, and on CUDA the MFU against the card's peak and peak memory.

        Throughput and MFU are those of the previous whole step (see on_train_batch_start); the first step after a
        start or resume logs none.
        """
        tokens = int(batch["attention_mask"].sum()) * self.trainer.world_size
        self.tokens_seen += tokens
        self.log("train/tokens_seen", float(self.tokens_seen), on_step=True, reduce_fx="max")
        if self._last_step is not None and self._last_step[2] > 0:
            last_tokens, last_flops, elapsed = self._last_step
            self.log("train/tokens_per_s", last_tokens / elapsed, on_step=True, prog_bar=True)
            peak = self._peak_flops()
            if peak:
                self.log("train/mfu", last_flops / elapsed / peak, on_step=True)
        flops = 0
        if self._peak_flops():  # rows are padded to seq_len, so the compute is over every position of the batch
            flops = self.flops_per_token(attention_context(batch["position_ids"])) * batch["input_ids"].numel()
        self._step_work = (tokens, flops)
        if self.device.type == "cuda":
            self.log("train/peak_memory_gb", torch.cuda.max_memory_allocated(self.device) / 2**30, on_step=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
