"""kd: end-to-end distillation against the teacher's logits (KL / reverse KL / JSD + optional CE), the
logits computed inside the chunked loss so no full-vocabulary batch of them exists."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from data.batch import shift_labels
from models import HybridForCausalLM
from models.flops import kd_step_flops
from models.teachers import adapter_for
from train.losses import KDLossConfig, kd_loss
from train.runtime.ranks import is_rank_zero

from .context import Context, load_student
from .module import DistillModule


class KDModule(DistillModule):
    def __init__(self, student: HybridForCausalLM, teacher: PreTrainedModel, optim: dict, loss: KDLossConfig):
        super().__init__(teacher, optim)
        self.student = student
        self.loss_cfg = loss

    def teacher_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return self.note_teacher_outputs(adapter_for(self.teacher).final_hidden(self.teacher, batch))

    def student_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.student.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state

    def loss_from_hidden(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, batch: dict):
        """The chunked KD loss on final hidden states (its lm_head gradients are computed in this forward)."""
        # Under ZeRO-3 the attribute read below, inside the engine's forward, gathers the partitioned weight
        # (DeepSpeed's external-parameter discovery); tests/train/test_deepspeed_zero3_cpu.py checks its gradient.
        return kd_loss(
            student_hidden,
            self.student.lm_head.weight,
            teacher_hidden,
            adapter_for(self.teacher).lm_head(self.teacher).weight,
            shift_labels(batch["labels"]),
            self.loss_cfg,
        )

    def _loss(self, batch):
        return self.loss_from_hidden(self.student_hidden(batch), self.teacher_hidden(batch), batch)

    def flops_per_token(self, context: float) -> int:
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
        out = self._loss(batch)
        self.log("val/loss", out.loss, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("val/kd/divergence", out.divergence, on_epoch=True, sync_dist=True)
        self.log("val/kd/top1_agreement", out.top1_agreement, on_epoch=True, sync_dist=True)
        # The student's own held-out CE, computed by the loss whatever ce_weight is: the quality-vs-tokens curve.
        self.log("val/kd/ce", out.ce, on_epoch=True, sync_dist=True)


def run(ctx: Context) -> dict:
    source = ctx.latest_student_dir()
    student = load_student(source)
    if ctx.cfg.student.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    module = KDModule(student, ctx.teacher, ctx.cfg.kd.optimizer(), ctx.cfg.kd)  # kd.* is the loss config
    trainer = ctx.fit("kd", module, "kd")
    if not is_rank_zero():
        return {}
    trained = ctx.trained_student("kd", trainer, module.student, "student.", source)
    ctx.save_student(trained, ctx.stage_dir("kd") / "student")
    ctx.report["kd"] = {"tokens_seen": module.tokens_seen}
    return {"tokens_seen": module.tokens_seen}
