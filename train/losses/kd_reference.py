"""The references the chunked KD loss is tested against: full (B, T, V) logits for both models, plain autograd."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .kd import IGNORE_INDEX, KDLossConfig, KDLossOutput, _check_kd_inputs, _softmax_dtype


def divergence_from_logits(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, cfg: KDLossConfig
) -> torch.Tensor:
    """Per-token D (..., V) -> (...), full vocabulary, plain autograd: the reference for the chunked path.

    Temperature and the T^2 factor as configured; differentiable in both arguments (kd_loss treats the
    teacher as a constant)."""
    dtype = _softmax_dtype(student_logits.dtype)
    temp = float(cfg.temperature)
    logq = F.log_softmax(student_logits.to(dtype) / temp, dim=-1)
    logp = F.log_softmax(teacher_logits.to(dtype) / temp, dim=-1)
    name = cfg.resolved_divergence
    if name == "forward_kl":
        div = (logp.exp() * (logp - logq)).sum(-1)
    elif name == "reverse_kl":
        div = (logq.exp() * (logq - logp)).sum(-1)
    else:
        beta = float(cfg.jsd_beta)
        logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
        div = beta * (logp.exp() * (logp - logm)).sum(-1) + (1 - beta) * (logq.exp() * (logq - logm)).sum(-1)
    return div * cfg.t2_factor


def kd_loss_ref(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head_weight: torch.Tensor,
    targets: torch.Tensor,
    cfg: KDLossConfig,
    student_head_bias: torch.Tensor | None = None,
    teacher_head_bias: torch.Tensor | None = None,
) -> KDLossOutput:
    """`kd_loss` computed the obvious way: full (B, T, V) logits for both models, autograd. Tests only."""
    _check_kd_inputs(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, targets)
    dtype = _softmax_dtype(student_hidden.dtype)
    valid = targets != IGNORE_INDEX
    student_logits = F.linear(student_hidden, student_head_weight, student_head_bias).to(dtype)[valid]  # (N, V)
    with torch.no_grad():
        teacher_logits = F.linear(teacher_hidden, teacher_head_weight, teacher_head_bias).to(dtype)[valid]
    n = student_logits.shape[0]
    div = divergence_from_logits(student_logits, teacher_logits, cfg).sum() / max(n, 1)
    ce = F.cross_entropy(student_logits, targets[valid].long(), reduction="sum") / max(n, 1)
    agree = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).sum() / max(n, 1)
    return KDLossOutput(
        loss=cfg.kl_weight * div + cfg.ce_weight * ce,
        divergence=div.detach(),
        ce=ce.detach(),
        num_tokens=n,
        top1_agreement=agree.to(dtype),
    )
