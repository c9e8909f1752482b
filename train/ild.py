"""ILD: layer-wise distillation. Every student layer gets the teacher's input to that layer and learns to
reproduce the teacher layer's output and its attention (mixer) output; all layers train in one pass over
one teacher forward. With `candidates` both an MLA and a Mamba2 student are aligned against the same
teacher pass, so per-layer losses of both kinds exist for layer selection."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from models import HybridForCausalLM
from models.documents import documents_from_positions
from models.flops import training_flops_per_token

from .deepspeed_strategy import is_zero3
from .distill_module import DistillModule
from .losses import ild_loss
from .teacher_pass import TeacherTrace, trace_teacher


class ILDModule(DistillModule):
    def __init__(
        self,
        students: dict[str, HybridForCausalLM],
        teacher: PreTrainedModel,
        optim: dict,
        loss_kind: str = "mse",
        output_weight: float = 1.0,
        mixer_weight: float = 1.0,
        trainable: str = "mixers",
    ):
        """`students`: {"assigned": student} for a fixed layer map, or {kind name: all-that-kind student} for every
        candidate kind (models.mixers.candidate_kinds)."""
        super().__init__(teacher, optim)
        self.students = nn.ModuleDict(students)
        self.loss_kind, self.output_weight, self.mixer_weight = loss_kind, output_weight, mixer_weight
        self.trainable = trainable
        for student in self.students.values():
            student.requires_grad_(False)
            for layer in student.model.layers:
                (layer.mixer if trainable == "mixers" else layer).requires_grad_(True)

    def flops_per_token(self, context: float) -> int:
        students = list(self.students.values())
        return training_flops_per_token("ild", self.teacher, students, context, self.trainable)

    def layer_losses(self, batch: dict[str, torch.Tensor]) -> dict[tuple[str, int], torch.Tensor]:
        """{(candidate, layer): loss} for one batch."""
        return self.losses_from_trace(trace_teacher(self.teacher, batch), batch)

    def losses_from_trace(
        self, trace: TeacherTrace, batch: dict[str, torch.Tensor]
    ) -> dict[tuple[str, int], torch.Tensor]:
        """Every student layer on the teacher's input to it, scored against the teacher layer's outputs."""
        positions = batch["position_ids"]
        docs = documents_from_positions(positions)
        mask = batch["attention_mask"].bool()
        losses = {}
        for name, student in self.students.items():
            cos, sin = student.model.rope(positions)
            # Not `embed_tokens.weight`: under ZeRO-3 that attribute read would gather it for the rest of the step.
            first = next(student.parameters())
            dtype = first.dtype
            # ZeRO-3 reduces a leaf layer's gradients in a full backward hook, which fires once the gradient wrt
            # the layer's inputs exists, or, when no input requires grad (the teacher's hidden states), as soon as
            # the output gradients arrive: before the layer's backward, which then meets released parameters.
            # A grad-requiring input orders it after (at the cost of the mixer's input-projection dgrad).
            needs_input_grad = is_zero3(first) and torch.is_grad_enabled()
            for i, layer in enumerate(student.model.layers):
                hidden = trace.inputs[i].to(dtype)
                hidden = hidden.detach().requires_grad_() if needs_input_grad else hidden
                out, mixed = layer(hidden, cos, sin, docs, with_mixer=True)
                losses[(name, i)] = self.output_weight * ild_loss(
                    out, trace.outputs[i], mask, self.loss_kind
                ) + self.mixer_weight * ild_loss(mixed, trace.attn_outputs[i], mask, self.loss_kind)
        return losses

    def training_step(self, batch, batch_idx):
        losses = self.layer_losses(batch)
        total = torch.stack(list(losses.values())).sum()
        for (name, i), value in losses.items():
            self.log(f"train/ild/{name}/layer_{i}", value.detach(), on_step=True)
        # The mean over ranks: the logged loss is the global batch's at any GPU count.
        self.log("train/loss", total.detach(), on_step=True, prog_bar=True, sync_dist=True)
        self.log_throughput(batch)
        return total

    def validation_step(self, batch, batch_idx):
        losses = self.layer_losses(batch)
        for (name, i), value in losses.items():
            self.log(f"val/ild/{name}/layer_{i}", value, on_epoch=True, sync_dist=True)
        self.log("val/loss", torch.stack(list(losses.values())).sum(), on_epoch=True, prog_bar=True, sync_dist=True)


def compose_student(candidates: dict[str, HybridForCausalLM], mixer_types: list[str]) -> HybridForCausalLM:
    """A student with the given map, each layer taken from the aligned candidate of its kind."""
    source = next(iter(candidates.values()))
    config = source.config.__class__.from_dict(source.config.to_dict())
    config.mixer_types = list(mixer_types)
    config.validate_hybrid()
    student = HybridForCausalLM(config).to(source.dtype)
    state = {}
    for name, tensor in source.state_dict().items():
        if not name.startswith("model.layers."):
            state[name] = tensor
    for i, kind in enumerate(mixer_types):
        prefix = f"model.layers.{i}."
        for name, tensor in candidates[kind].state_dict().items():
            if name.startswith(prefix):
                state[name] = tensor
    student.load_state_dict(state, strict=True)
    return student
