"""KD against a cached sparse teacher distribution (offline KD, `kd.teacher_cache`), chunked over tokens.

The cache holds, per token, the teacher's top-k token ids S (sorted by decreasing probability), their log-probs
log p_i at temperature T (the cache's), and the log of the remaining mass log p_rest = log(1 - sum_S p_i). The
student's q = softmax(z / T) is lumped the same way: q_i at the teacher's ids and q_rest = sum_{v not in S} q_v.

    D = T^2 * KL(p_S+rest || q_S+rest) = T^2 * [sum_{i in S} p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest)]

This approximates the full-vocabulary forward KL of train/losses/kd.py: the k + 1 buckets are a coarsening of the
vocabulary, so (log-sum inequality) D is never larger than the full KL, and equal to it at k = V (or when the
student's distribution over the non-top-k tokens is proportional to the teacher's). What it cannot see is how the
student spreads its rest mass among the non-top-k tokens. The gap is measured in tests/train/test_kd_topk.py and
docs/performance.md. CE (temperature 1, hard targets) and top-1 agreement (against the teacher's first id) are as in
kd.py; only forward KL is implemented.

Chunks: the valid tokens are processed `chunk_tokens` at a time; each chunk computes its (n, V) student logits, the
loss terms and the closed-form gradient wrt the student logits, with u = z / T, P = sum_S p_i + p_rest:

    dKL/du_v = P q_v - p_v [v in S] - p_rest q_v / q_rest [v not in S]

turned at once into gradients of the hidden states, lm_head weight and bias (the manual per-chunk backward of kd.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kd import IGNORE_INDEX, KDLossConfig, KDLossOutput, _softmax_dtype, run_chunked

TOPK_DIVERGENCES = ("forward_kl",)


def check_topk_config(cfg: KDLossConfig) -> None:
    """The settings the top-k loss computes: forward KL only (the cache stores no teacher logits to mix with q)."""
    if cfg.resolved_divergence not in TOPK_DIVERGENCES:
        raise ValueError(
            f"kd.divergence={cfg.divergence!r} is invalid with kd.teacher_cache (top-k teacher log-probs); "
            f"allowed: {', '.join(TOPK_DIVERGENCES)}"
        )


def _chunk(h, w, b, ids, logp, rest, targets, cfg: KDLossConfig, coefs, dtype):
    """One chunk of n tokens: per-token D (with T^2), CE, agreement and d(loss)/dz (n, V) or None."""
    temp = float(cfg.temperature)
    rows = torch.arange(targets.shape[0], device=targets.device)
    z = F.linear(h, w, b).to(dtype)  # (n, V)
    agree = z.argmax(-1) == ids[:, 0]
    lse1 = torch.logsumexp(z, -1)
    ce = lse1 - z[rows, targets]
    grad_ce = (z - lse1[:, None]).exp_() if coefs is not None and coefs[1] != 0 else None  # softmax(z)
    logq = F.log_softmax(z / temp if temp != 1 else z, dim=-1)
    del z
    in_s = torch.zeros_like(logq, dtype=torch.bool).scatter_(1, ids, True)  # (n, V): the teacher's top-k
    logq_s = logq.gather(1, ids)  # (n, k)
    logq_rest = logq.masked_fill(in_s, float("-inf")).logsumexp(-1)  # (n,), -inf at k = V
    p_s, p_rest = logp.exp(), rest.exp()
    has_rest = p_rest > 0  # 0 * (-inf) would be nan: a bucket of zero mass adds nothing
    rest_term = torch.where(has_rest, p_rest * (rest - logq_rest.where(has_rest, 0)), 0)
    div = (p_s * (logp - logq_s)).sum(-1) + rest_term
    grad = None
    if coefs is not None and coefs[0] != 0:
        grad = logq.exp() * (p_s.sum(-1) + p_rest)[:, None]  # P q
        grad.scatter_add_(1, ids, -p_s)  # - p on S
        ratio = (logq - logq_rest.where(has_rest, 0)[:, None]).exp_().masked_fill_(in_s, 0)  # q_v / q_rest off S
        grad -= ratio.mul_(p_rest[:, None])
        grad.mul_(coefs[0])
    if grad_ce is not None:  # ce_coef * (softmax(z) - onehot(targets))
        grad_ce[rows, targets] -= 1
        grad_ce.mul_(coefs[1])
        grad = grad_ce if grad is None else grad.add_(grad_ce)
    return div * cfg.t2_factor, ce, agree, grad


def kd_topk_loss(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logp: torch.Tensor,
    teacher_rest: torch.Tensor,
    targets: torch.Tensor,
    cfg: KDLossConfig,
    student_head_bias: torch.Tensor | None = None,
) -> KDLossOutput:
    """Chunked KD loss against top-k teacher log-probs (see the module docstring).

    student_hidden (B, T, D) after the final norm, student_head_weight (V, D); teacher_ids (B, T, k) integer ids in
    [0, V), sorted by decreasing teacher probability; teacher_logp (B, T, k) their log-probs at cfg.temperature;
    teacher_rest (B, T) the log of the mass outside them (-inf when none); targets (B, T), -100 where no loss.
    Gradients reach the student hidden states, weight and bias. Not twice differentiable."""
    check_topk_config(cfg)
    if teacher_ids.shape[:-1] != targets.shape or teacher_logp.shape != teacher_ids.shape:
        raise ValueError(
            f"kd_topk_loss: teacher_ids {tuple(teacher_ids.shape)} and teacher_logp {tuple(teacher_logp.shape)} "
            f"must be targets {tuple(targets.shape)} + (k,)"
        )
    if teacher_rest.shape != targets.shape or student_hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"kd_topk_loss: teacher_rest {tuple(teacher_rest.shape)} must be targets {tuple(targets.shape)} and "
            f"student_hidden {tuple(student_hidden.shape)} targets + (hidden,)"
        )
    vocab = student_head_weight.shape[0]
    valid = (targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)  # (N,)
    k = teacher_ids.shape[-1]
    ids = teacher_ids.reshape(-1, k).index_select(0, valid).long()  # (N, k)
    labels = targets.reshape(-1).index_select(0, valid).long()
    if ids.numel() and not bool(((ids >= 0) & (ids < vocab)).all() & ((labels >= 0) & (labels < vocab)).all()):
        raise ValueError(f"kd_topk_loss: teacher ids and targets must be token ids in [0, {vocab})")
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, valid)  # (N, D)
    logp = teacher_logp.reshape(-1, k).index_select(0, valid).detach()
    rest = teacher_rest.reshape(-1).index_select(0, valid).detach()

    def terms(rows, h, w, b, coefs, dtype):
        return _chunk(h, w, b, ids[rows], logp[rows].to(dtype), rest[rows].to(dtype), labels[rows], cfg, coefs, dtype)

    loss, div, ce, agree = run_chunked(hidden, student_head_weight, student_head_bias, cfg, terms)
    return KDLossOutput(loss=loss, divergence=div, ce=ce, num_tokens=int(valid.numel()), top1_agreement=agree)


def teacher_topk(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the cache stores for teacher logits (n, V): the top-k ids (n, k) int32 sorted by decreasing probability,
    their log-probs at `temperature` (n, k) and the log of the mass outside them (n,), in fp32 at least."""
    logp = F.log_softmax(logits.to(_softmax_dtype(logits.dtype)) / temperature, dim=-1)
    top, ids = logp.topk(k, dim=-1, sorted=True)
    # Summed over the tokens outside the top-k (not log1p(-sum p_S), which cancels when p_S is close to 1).
    rest = logp.scatter_(1, ids, float("-inf")).logsumexp(-1)
    return ids.to(torch.int32), top, rest
