"""kd: end-to-end distillation against the teacher's logits (KL / reverse KL / JSD + optional CE), the
logits computed inside the chunked loss so no full-vocabulary batch of them exists. With kd.teacher_cache, against
the teacher's cached top-k log-probs instead (train/losses/kd_topk.py): no teacher is loaded, each training batch's
rows are read from the cache by their stream positions, and validation reports the student's CE only."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from data.batch import shift_labels
from data.datamodule import DistillDataModule
from models import HybridForCausalLM
from models.flops import forward_flops, kd_step_flops
from train.losses import IGNORE_INDEX, KDLossConfig, KDLossOutput, kd_loss, kd_topk_loss
from train.runtime.ranks import is_rank_zero
from train.runtime.teacher_cache import TeacherCache, open_teacher_cache

from .context import Context
from .module import DistillModule

log = logging.getLogger(__name__)


def shared_vocabulary(student_head: torch.Tensor, teacher_head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both lm_head weights (V, D) cut to their shared rows. A KD teacher of the same tokenizer may pad its
    embedding matrix further (Qwen2.5 0.5B: 151936 rows, 7B: 152064): no token id reaches the rows past the
    tokenizer (checked when the KD teacher loads), so KD runs on the softmax over the rows both have."""
    rows = min(student_head.shape[0], teacher_head.shape[0])
    if student_head.shape[0] == teacher_head.shape[0]:  # the usual case: the parameters themselves, no view
        return student_head, teacher_head
    return student_head[:rows], teacher_head[:rows]


class KDModule(DistillModule):
    def __init__(
        self,
        student: HybridForCausalLM,
        teacher: PreTrainedModel | None,
        optim: dict,
        loss: KDLossConfig,
        cache: TeacherCache | None = None,
    ):
        super().__init__(teacher, optim)
        self.student = student
        self.loss_cfg = loss
        self.cache = cache  # offline KD: the teacher's top-k by stream position (teacher is None then)

    def teacher_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.note_teacher_outputs(self.teacher_pass(batch))

    def student_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.student.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state

    def loss_from_hidden(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, batch: dict):
        """The chunked KD loss on final hidden states (its lm_head gradients are computed in this forward)."""
        # Under ZeRO-3 the student's attribute read below, inside the engine's forward, gathers the partitioned
        # weight (DeepSpeed's external-parameter discovery); tests/train/test_deepspeed_zero3_cpu.py checks its
        # gradient. The teacher's (teacher.shard) is outside any forward of its own: gathered for the loss, which
        # reads it in its forward only (no teacher tensor is kept for the backward).
        with self.teacher_head() as teacher_head:
            student_head, teacher_head = shared_vocabulary(self.student.lm_head.weight, teacher_head)
            return kd_loss(
                student_hidden, student_head, teacher_hidden, teacher_head, shift_labels(batch["labels"]), self.loss_cfg
            )

    def _loss(self, batch):
        if self.cache is not None:
            return self.cached_loss(batch)
        return self.loss_from_hidden(self.student_hidden(batch), self.teacher_hidden(batch), batch)

    def cached_loss(self, batch: dict) -> KDLossOutput:
        """The top-k loss against the cache's rows at this batch's stream positions."""
        ids, logp, rest = (t.to(self.device) for t in self.cache.lookup(batch["stream_index"]))
        head = self.student.lm_head.weight
        return kd_topk_loss(self.student_hidden(batch), head, ids, logp, rest, shift_labels(batch["labels"]),
                            self.loss_cfg)  # fmt: skip

    def held_out_ce(self, batch: dict) -> torch.Tensor:
        """The student's CE on held-out rows (no teacher outputs are cached for them), chunked over tokens."""
        targets = shift_labels(batch["labels"]).reshape(-1)
        valid = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        hidden = self.student_hidden(batch)
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, valid)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, valid.numel(), self.loss_cfg.chunk_tokens):
            logits = self.student.lm_head(hidden[start : start + self.loss_cfg.chunk_tokens]).float()
            total += F.cross_entropy(
                logits, targets[valid[start : start + self.loss_cfg.chunk_tokens]], reduction="sum"
            )
        return total / max(valid.numel(), 1)

    def flops_per_token(self, context: float) -> int:
        if self.teacher is None:  # offline KD: the student's forward and backward only
            return 3 * forward_flops(self.student, context)
        return kd_step_flops(self.teacher, self.student, context)

    def training_step(self, batch, batch_idx):
        out = self._loss(batch)
        # The mean over ranks: the logged loss is the global batch's at any GPU count.
        self.log("train/loss", out.loss.detach(), on_step=True, prog_bar=True, sync_dist=True)
        self.log("train/kd/divergence", out.divergence.detach(), on_step=True)
        self.log("train/kd/ce", out.ce.detach(), on_step=True)
        self.log_throughput(batch)
        return out.loss

    def validation_step(self, batch, batch_idx):
        if self.cache is not None:
            self.log("val/kd/ce", self.held_out_ce(batch), on_epoch=True, sync_dist=True)
            return
        out = self._loss(batch)
        self.log("val/loss", out.loss, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("val/kd/divergence", out.divergence, on_epoch=True, sync_dist=True)
        self.log("val/kd/top1_agreement", out.top1_agreement, on_epoch=True, sync_dist=True)
        # The student's own held-out CE, computed by the loss whatever ce_weight is: the quality-vs-tokens curve.
        self.log("val/kd/ce", out.ce, on_epoch=True, sync_dist=True)


def run(ctx: Context) -> dict:
    source = ctx.latest_student_dir()
    student = ctx.load_student(source)
    if ctx.cfg.student.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    cache = open_teacher_cache(ctx.cfg, ctx.tokenizer) if ctx.cfg.kd.teacher_cache else None  # checked: exit 2
    # teacher.*, or kd.teacher_name_or_path (then teacher.* is released first); none when the cache holds its outputs
    teacher = None if cache is not None else ctx.kd_teacher()
    if cache is not None:
        log.info("kd: distilling from the teacher cache %s (k=%d); no teacher loaded", cache.path, cache.manifest["k"])
    module = KDModule(student, teacher, ctx.cfg.kd.optimizer(), ctx.cfg.kd, cache)  # kd.* is the loss config
    module.shard_teacher = ctx.cfg.teacher.shard
    data = DistillDataModule(ctx.data_cfg, ctx.tokenizer, phase="kd", keep_stream_index=cache is not None)
    trainer = ctx.fit("kd", module, "kd", datamodule=data)
    if not is_rank_zero():
        return {}
    trained = ctx.trained_student("kd", trainer, module.student, "student.", source)
    ctx.save_student(trained, ctx.stage_dir("kd") / "student")
    ctx.report["kd"] = {"tokens_seen": module.tokens_seen}
    return {"tokens_seen": module.tokens_seen}
