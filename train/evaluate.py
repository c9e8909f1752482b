"""Held-out evaluation of any causal LM on packed batches: loss (mean CE over valid tokens) and perplexity."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from data.batch import shift_labels
from models import HybridForCausalLM
from models.teachers import adapter_for

from .losses import KDLossConfig, kd_loss

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


def eval_placement(trainer_cfg: Mapping[str, Any]) -> Placement:
    """The training stages' device and precision (the `trainer` config group): a GPU run evaluates on its GPU in
    bf16, in seconds, rather than on the host in fp32 (Lightning hands modules back on the CPU after `fit`)."""
    accelerator = str(trainer_cfg.get("accelerator", "cpu"))
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.accelerator={accelerator!r} but CUDA is not available for evaluation")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return Placement(device, AUTOCAST_DTYPES.get(str(trainer_cfg.get("precision", "32-true"))))


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
    student: HybridForCausalLM, teacher: torch.nn.Module, loader: DataLoader, max_batches: int | None = None
) -> dict[str, float]:
    """Token-weighted KL(teacher || student) per token and top-1 agreement on the eval stream (chunked)."""
    cfg = KDLossConfig(divergence="forward_kl", chunk_tokens=2048)
    device = next(student.parameters()).device
    kl, agree, tokens = 0.0, 0.0, 0
    adapter = adapter_for(teacher)
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        t_hidden = adapter.final_hidden(teacher, batch)
        s_hidden = student.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
        t_weight = adapter.lm_head(teacher).weight
        out = kd_loss(s_hidden, student.lm_head.weight, t_hidden, t_weight, shift_labels(batch["labels"]), cfg)
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
            out = model.generate(
                **{k: v.to(device) for k, v in ids.items()},
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            row[name] = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        rows.append(row)
    return rows
