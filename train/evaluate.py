"""Held-out evaluation of any causal LM on packed batches: loss (mean CE over valid tokens) and perplexity."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from data.batch import shift_labels, teacher_inputs
from models import HybridForCausalLM


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
            logits = model(**teacher_inputs(batch, model)).logits
        targets = shift_labels(batch["labels"])
        total += F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
        ).item()
        tokens += int((targets != -100).sum())
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}
