"""eval: the teacher, the initialized and the final student on the held-out stream (loss, perplexity, KL to the
teacher, top-1 agreement, KV bytes per token), and greedy generations side by side. Runs on the training stages'
device and precision; the functions below work for any causal LM on packed batches."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from data.batch import shift_labels
from data.datamodule import DistillDataModule
from models import HybridForCausalLM, student_cache_bytes, teacher_cache_bytes
from models.teachers import adapter_for, sdpa_attention
from train.config.schema import TrainerConfig
from train.losses import KDLossConfig, kd_loss
from train.runtime.plots import plot_losses
from train.runtime.teachers import separate_kd_teacher

from . import TRAINING_STAGES
from .context import Context, initialized_student_dir
from .kd import shared_vocabulary

log = logging.getLogger(__name__)

# Lightning precision -> the autocast dtype its training steps run under (None: full precision).
AUTOCAST_DTYPES = {
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "bf16": torch.bfloat16,
    "16-mixed": torch.float16,
    "16-true": torch.float16,
    "16": torch.float16,
}


@dataclass(frozen=True)
class Placement:
    """Where held-out evaluation runs and under which autocast dtype: those of the run's training steps."""

    device: torch.device
    autocast: torch.dtype | None

    def context(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)


def eval_placement(trainer_cfg: TrainerConfig) -> Placement:
    """The training stages' device and precision (the `trainer` config group): a GPU run evaluates on its GPU in
    bf16, in seconds, rather than on the host in fp32 (Lightning hands modules back on the CPU after `fit`)."""
    accelerator = str(trainer_cfg.accelerator)
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.accelerator={accelerator!r} but CUDA is not available for evaluation")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return Placement(device, AUTOCAST_DTYPES.get(str(trainer_cfg.precision)))


@contextlib.contextmanager
def placed(models: Mapping[str, torch.nn.Module], placement: Placement) -> Iterator[None]:
    """Move `models` to the placement's device for the block (under its autocast), and back where they were."""
    homes = {name: next(m.parameters()).device for name, m in models.items()}
    for model in models.values():
        model.to(placement.device)
    try:
        with placement.context():
            yield
    finally:
        for name, model in models.items():
            model.to(homes[name])


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, loader: DataLoader, max_batches: int | None = None) -> dict[str, float]:
    """Token-weighted mean next-token CE on the eval stream; HF teachers get the packed-document mask."""
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        if isinstance(model, HybridForCausalLM):
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        else:
            logits = adapter_for(model).logits(model, batch)
        targets = shift_labels(batch["labels"])
        total += F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
        ).item()
        tokens += int((targets != -100).sum())
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


@torch.no_grad()
def heldout_agreement(
    student: HybridForCausalLM,
    teacher: torch.nn.Module,
    loader: DataLoader,
    max_batches: int | None = None,
    chunk_tokens: int = KDLossConfig.chunk_tokens,
) -> dict[str, float]:
    """Token-weighted KL(teacher || student) per token and top-1 agreement on the eval stream, through the chunked
    KD loss (`chunk_tokens` valid tokens per logits chunk: the run's kd.chunk_tokens)."""
    cfg = KDLossConfig(divergence="forward_kl", chunk_tokens=chunk_tokens)
    device = next(student.parameters()).device
    kl, agree, tokens = 0.0, 0.0, 0
    adapter = adapter_for(teacher)
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        t_hidden = adapter.final_hidden(teacher, batch)
        s_hidden = student.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
        s_weight, t_weight = shared_vocabulary(student.lm_head.weight, adapter.lm_head(teacher).weight)
        out = kd_loss(s_hidden, s_weight, t_hidden, t_weight, shift_labels(batch["labels"]), cfg)
        kl += out.divergence.item() * out.num_tokens
        agree += float(out.top1_agreement) * out.num_tokens
        tokens += out.num_tokens
    return {"kl_to_teacher": kl / max(tokens, 1), "top1_agreement": agree / max(tokens, 1)}


@torch.no_grad()
def side_by_side(models: dict[str, torch.nn.Module], tokenizer, prompts: list[str], max_new_tokens: int) -> list[dict]:
    """Greedy continuations of each prompt by each model."""
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        row = {"prompt": prompt}
        for name, model in models.items():
            device = next(model.parameters()).device
            with sdpa_attention(model):
                out = model.generate(
                    **{k: v.to(device) for k, v in ids.items()},
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            row[name] = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        rows.append(row)
    return rows


def run(ctx: Context) -> dict:
    """Teacher, initialized and final student on the held-out stream, on the training stages' device and precision."""
    data = DistillDataModule(ctx.data_cfg, ctx.tokenizer, phase="kd")
    data.setup()
    loader = data.val_dataloader()
    max_batches = ctx.cfg.eval.max_batches
    placement = eval_placement(ctx.cfg.trainer)
    initialized = initialized_student_dir(ctx.out)
    candidates = [("initialized student", initialized), ("final student", ctx.latest_student_dir())]
    students = {name: ctx.load_student(path) for name, path in candidates if (path / "config.json").exists()}
    rows: dict[str, dict] = {}
    # A separate KD teacher is scored too (row "kd teacher"), and the students against it (kl_to_kd_teacher,
    # top1_agreement_kd_teacher); the "teacher" row and keys stay those of teacher.*.
    teachers = {"teacher": ctx.teacher}
    if separate_kd_teacher(ctx.cfg):
        teachers["kd teacher"] = ctx.kd_teacher(keep_teacher=True)
    start = time.perf_counter()
    with placed({**teachers, **students}, placement):
        for name, teacher in teachers.items():
            rows[name] = heldout_loss(teacher, loader, max_batches)
        for name, student in students.items():
            rows[name] = heldout_loss(student, loader, max_batches)
            for teacher_name, teacher in teachers.items():
                scores = heldout_agreement(student, teacher, loader, max_batches, ctx.cfg.kd.chunk_tokens)
                if teacher_name != "teacher":
                    scores = {"kl_to_kd_teacher": scores["kl_to_teacher"], "top1_agreement_kd_teacher": scores[
                        "top1_agreement"]}  # fmt: skip
                rows[name].update(scores)
        scored = time.perf_counter()
        prompts = [
            ctx.tokenizer.decode(b["input_ids"][0, :12], skip_special_tokens=True)
            for b in first_batches(loader, ctx.cfg.eval.num_generations)
        ]
        ctx.report["generations"] = side_by_side(
            {"teacher": ctx.teacher, **students}, ctx.tokenizer, prompts, ctx.cfg.eval.max_new_tokens
        )
    seconds = {"scores": scored - start, "generations": time.perf_counter() - scored}
    log.info(
        "eval on %s (autocast %s): scores %.1f s, generations %.1f s",
        placement.device,
        placement.autocast,
        seconds["scores"],
        seconds["generations"],
    )
    for name, teacher in teachers.items():
        spec = adapter_for(teacher).describe(teacher.config)
        rows[name]["params"] = sum(p.numel() for p in teacher.parameters())
        rows[name]["kv_bytes_per_token"] = teacher_cache_bytes(
            spec.num_layers, spec.num_kv_heads, spec.head_dim
        ).per_token
    for name, student in students.items():
        rows[name]["params"] = sum(p.numel() for p in student.parameters())
        rows[name]["kv_bytes_per_token"] = student_cache_bytes(student.config).per_token
    ctx.report["eval"] = rows
    ctx.report["eval_placement"] = {"device": str(placement.device), "autocast": str(placement.autocast)}
    ctx.report["eval_seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    ctx.report["tokens_seen"] = sum(ctx.report.get(s, {}).get("tokens_seen", 0) for s in TRAINING_STAGES)
    print(summary_table(rows))
    plot_losses(ctx.out, ctx.out / "loss_curves.png")
    return {}


def first_batches(loader: DataLoader, count: int) -> list[dict]:
    batches = []
    for batch in loader:
        if len(batches) >= count:
            break
        batches.append(batch)
    return batches


def summary_table(rows: dict[str, dict]) -> str:
    lines = [
        f"{'model':<20} {'held-out loss':>13} {'perplexity':>10} {'KL to teacher':>13} {'top-1 agree':>11} "
        f"{'KV B/token':>10} {'params':>12}"
    ]
    for name, row in rows.items():
        kl = f"{row['kl_to_teacher']:>13.4f}" if "kl_to_teacher" in row else f"{'-':>13}"
        agree = f"{row['top1_agreement']:>11.3f}" if "top1_agreement" in row else f"{'-':>11}"
        lines.append(
            f"{name:<20} {row['loss']:>13.4f} {row['perplexity']:>10.2f} {kl} {agree} {row['kv_bytes_per_token']:>10} "
            f"{row['params']:>12,}"
        )
    return "\n".join(lines)


def wandb_log(run, out: Path, report: dict, entry: dict) -> None:
    """Every number of the eval table as a W&B summary value (eval/<model>/<metric>)."""
    for model, row in report.get("eval", {}).items():
        for key, value in row.items():
            if isinstance(value, (int, float)):
                run.summary[f"eval/{model.replace(' ', '_')}/{key}"] = value
