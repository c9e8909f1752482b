"""ild: layer-wise distillation. Every student layer gets the teacher's input to that layer and learns to
reproduce the teacher layer's output and its attention (mixer) output; all layers train in one pass over
one teacher forward. With `candidates` an all-MLA student and one all-<kind> student per `select.fill_kinds` entry
are aligned against the same teacher pass, so per-layer losses of every candidate kind exist for layer selection."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from data.datamodule import DistillDataModule
from models import HybridForCausalLM
from models.flops import ild_step_flops
from models.mixers import candidate_kinds
from models.teachers import TeacherTrace
from train.losses import ILDLossConfig, ild_layer_loss
from train.runtime.deepspeed_strategy import is_zero3
from train.runtime.plots import plot_ild_layers
from train.runtime.ranks import is_rank_zero

from .context import Context, load_student, write_json
from .eval import eval_placement, placed
from .init import wants_candidates
from .module import DistillModule


class ILDModule(DistillModule):
    def __init__(
        self,
        students: dict[str, HybridForCausalLM],
        teacher: PreTrainedModel,
        optim: dict,
        loss: ILDLossConfig | None = None,
        trainable: str = "mixers",
    ):
        """`students`: {"assigned": student} for a fixed layer map, or {kind name: all-that-kind student} for every
        candidate kind (models.mixers.candidate_kinds: MLA and select.fill_kinds)."""
        super().__init__(teacher, optim)
        self.students = nn.ModuleDict(students)
        self.loss_cfg = loss or ILDLossConfig()
        self.trainable = trainable
        for student in self.students.values():
            student.requires_grad_(False)
            for layer in student.model.layers:
                (layer.mixer if trainable == "mixers" else layer).requires_grad_(True)

    def flops_per_token(self, context: float) -> int:
        students = list(self.students.values())
        return ild_step_flops(self.teacher, students, context, mlp_trained=self.trainable == "layers")

    def layer_losses(self, batch: dict[str, torch.Tensor]) -> dict[tuple[str, int], torch.Tensor]:
        """{(candidate, layer): loss} for one batch."""
        trace = self.teacher_pass(batch, trace=True)
        self.note_teacher_outputs(trace.final_hidden)
        return self.losses_from_trace(trace, batch)

    def losses_from_trace(
        self, trace: TeacherTrace, batch: dict[str, torch.Tensor]
    ) -> dict[tuple[str, int], torch.Tensor]:
        """Every student layer on the teacher's input to it, scored against the teacher layer's outputs."""
        positions = batch["position_ids"]
        mask = batch["attention_mask"].bool()
        losses = {}
        documents = {}  # per document_masking (the run's, for every candidate): built once per batch, not per student
        for name, student in self.students.items():
            masking = student.config.document_masking
            if masking not in documents:
                documents[masking] = student.model.documents(positions)
            docs = documents[masking]
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
                terms = ild_layer_loss(out, trace.outputs[i], mixed, trace.attn_outputs[i], mask, self.loss_cfg)
                losses[(name, i)] = terms.loss
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
    """A student with the given (per-layer) map, each layer and its kind's settings taken from the aligned candidate
    of its kind (an all-<kind> candidate's config holds that kind's per-layer choices, e.g. MLA ranks)."""
    source = next(iter(candidates.values()))
    config = source.config.__class__.from_dict(source.config.to_dict())
    config.mixer_types = list(mixer_types)
    for kind in set(mixer_types):
        setattr(config, kind, copy.deepcopy(getattr(candidates[kind].config, kind)))
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


def run(ctx: Context) -> dict:
    init = ctx.stage_dir("init")
    candidates = init / "candidates"
    if wants_candidates(ctx.cfg) and candidates.exists():
        sources = {kind: candidates / kind for kind in candidate_kinds(ctx.cfg.select.fill_kinds)}
    else:
        sources = {"assigned": init / "student"}
    students = {name: ctx.load_student(path) for name, path in sources.items()}
    c = ctx.cfg.ild
    module = ILDModule(students, ctx.teacher, c.optimizer(), c, c.trainable)
    module.shard_teacher = ctx.cfg.teacher.shard
    trainer = ctx.fit("ild", module, "ild")
    if not is_rank_zero():
        return {}
    trained = {
        name: ctx.trained_student("ild", trainer, module.students[name], f"students.{name}.", path)
        for name, path in sources.items()
    }
    # Per-layer losses of every candidate on held-out data (the input to layer selection).
    layer_losses = heldout_layer_losses(ctx, trained, module)
    write_json(ctx.stage_dir("ild") / "layer_losses.json", layer_losses)
    if (init / "student" / "config.json").exists():  # a fixed map: the student is known now
        mixer_types = load_student(init / "student").config.mixer_types
        student = trained.get("assigned") or compose_student(trained, mixer_types)
        ctx.save_student(student, ctx.stage_dir("ild") / "student")
    if "assigned" not in trained:
        for kind, candidate in trained.items():
            ctx.save_student(candidate, ctx.stage_dir("ild") / "candidates" / kind)
    plot_ild_layers(layer_losses, ctx.out / "ild_layer_losses.png")
    ctx.report["ild"] = {"tokens_seen": module.tokens_seen, "layer_losses": layer_losses}
    return {"tokens_seen": module.tokens_seen}


@torch.no_grad()
def heldout_layer_losses(
    ctx: Context, students: dict[str, HybridForCausalLM], module: ILDModule
) -> dict[str, dict[str, float]]:
    """{layer: {candidate: mean held-out ILD loss}} on rank 0, with the stage's loss settings, on the training
    stages' device and precision."""
    placement = eval_placement(ctx.cfg.trainer)
    probe = ILDModule(students, ctx.teacher, module.optim, module.loss_cfg).eval()
    data = DistillDataModule(ctx.data_cfg, ctx.tokenizer, "ild")
    data.setup()
    sums: dict[tuple[str, int], float] = {}
    batches = 0
    with placed({"probe": probe}, placement):
        for batch in data.val_dataloader():
            if ctx.cfg.eval.max_batches is not None and batches >= ctx.cfg.eval.max_batches:
                break
            batch = {k: v.to(placement.device) for k, v in batch.items()}
            for key, value in probe.layer_losses(batch).items():
                sums[key] = sums.get(key, 0.0) + float(value)
            batches += 1
    layer_losses: dict[str, dict[str, float]] = {}
    for (name, layer), total in sums.items():
        layer_losses.setdefault(str(layer), {})[name] = total / max(batches, 1)
    return layer_losses


def wandb_log(run, out: Path, report: dict, entry: dict) -> None:
    """The per-layer held-out losses as a W&B table, in the row of the stage's plot."""
    import wandb

    from train.runtime.tracking import layer_loss_rows

    losses = out / "ild" / "layer_losses.json"
    if losses.exists():
        rows = layer_loss_rows(json.loads(losses.read_text()))
        entry["ild/layer_losses"] = wandb.Table(columns=["layer", "candidate", "loss"], data=rows)
