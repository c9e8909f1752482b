"""End-to-end KD on the logits, chunked over tokens (`kd_loss`):

    loss = kl_weight * D + ce_weight * CE

Both terms are means over the valid tokens (targets != -100) of the whole batch: one mean over all valid
tokens, not a mean of per-sequence means. Under data parallelism each rank averages its own tokens.

p = softmax(teacher_logits / T), q = softmax(student_logits / T), and D is the per-token divergence
times T^2 when `scale_by_t2` (Hinton et al.: the gradient of the softened divergence shrinks like
1/T^2, the factor keeps its scale comparable across temperatures; at T = 1 it changes nothing):

- "forward_kl": KL(p || q) = sum_v p (log p - log q)   (mass covering; the default)
- "reverse_kl": KL(q || p) = sum_v q (log q - log p)   (mode seeking)
- "jsd":        beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
                (generalized JSD of GKD / TRL's `generalized_jsd_loss`; `jsd_beta` is the teacher's
                share of the mixture; 0.5 is the symmetric JSD, bounded by log 2). The formula is
                identically 0 at beta = 0 and 1, so there we follow TRL: beta = 0 is forward KL and
                beta = 1 is reverse KL (the limits of JSD / beta and JSD / (1 - beta)).

CE is the student's cross-entropy on the hard targets at temperature 1 (never scaled).

The logits never exist for the whole batch: the valid positions are selected first, then processed
`chunk_tokens` at a time. Each chunk computes both models' logits, the divergence and CE values, and the
gradient with respect to the student's logits in closed form (forward KL with T^2: T (q - p); see
`_divergence_`), which it immediately turns into gradients for the student hidden states, lm_head weight
and bias (a "manual per-chunk backward": nothing of the chunk is kept for autograd and nothing is
recomputed). The
autograd node only multiplies those stored gradients by the incoming scalar. On CUDA one fused Triton kernel
(train/losses/kd_kernel.py, `use_triton`) computes a chunk's softmaxes, divergence, CE and gradient from the two
logit tensors in the matmul dtype, writing the gradient over the student's: peak extra memory is those two
(chunk_tokens, V) tensors. The torch path (CPU, fp64, use_triton=False) keeps three (chunk_tokens, V) fp32
tensors for forward / reverse KL, four for JSD, one more when ce_weight > 0 (measured in the tests). Both add
an fp32 (V, D) accumulator for the weight gradient. Softmaxes run in fp32 (fp64 if the inputs are fp64);
matmuls run in the inputs' dtype, or the autocast dtype when autocast is on, as the model's own lm_head would.

`kd_loss_ref` (train/losses/kd_reference.py) is the plain full-vocabulary autograd version (same signature) and
`divergence_from_logits` the per-token reference divergence; the tests hold the chunked path to both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import kd_kernel

IGNORE_INDEX = -100
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _fail(key: str, value: object, allowed: str) -> None:
    raise ValueError(f"{key}={value!r} is invalid; allowed: {allowed}")


def _check_weight(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        _fail(key, value, "a finite number >= 0")


# ----------------------------------------------------------------------------------------------- configs


@dataclass
class KDLossConfig:
    """End-to-end distillation loss: kl_weight * D + ce_weight * CE (see the module docstring)."""

    divergence: str = "forward_kl"  # "forward_kl" KL(teacher || student), "reverse_kl", or "jsd"
    jsd_beta: float = 0.5  # teacher's share of the JSD mixture; 0.5 symmetric; 0 / 1 = forward / reverse KL
    temperature: float = 1.0  # applied to both models' logits for D only (CE stays at T = 1)
    scale_by_t2: bool = True  # multiply D by T^2 (Hinton), so its gradient scale does not shrink with T
    kl_weight: float = 1.0
    ce_weight: float = 0.0  # student cross-entropy on the hard targets
    # Valid tokens per logits chunk; peak memory: 2 (chunk_tokens, V) bf16 tensors with the fused kernel (1 GB
    # each at 4096 x 128K), 3-5 fp32 ones (2 GB each) on the torch path.
    chunk_tokens: int = 4096
    # CUDA logits: one fused Triton kernel per chunk (train/losses/kd_kernel.py) when Triton is importable.
    use_triton: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, key: str = "kd") -> None:
        if self.divergence not in DIVERGENCES:
            _fail(f"{key}.divergence", self.divergence, " | ".join(DIVERGENCES))
        beta = self.jsd_beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
            _fail(f"{key}.jsd_beta", beta, "a number in [0, 1]")
        temp = self.temperature
        if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not (math.isfinite(temp) and temp > 0):
            _fail(f"{key}.temperature", temp, "a finite number > 0")
        if not isinstance(self.scale_by_t2, bool):
            _fail(f"{key}.scale_by_t2", self.scale_by_t2, "True or False")
        _check_weight(f"{key}.kl_weight", self.kl_weight)
        _check_weight(f"{key}.ce_weight", self.ce_weight)
        if isinstance(self.chunk_tokens, bool) or not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 1:
            _fail(f"{key}.chunk_tokens", self.chunk_tokens, "an integer >= 1")
        if not isinstance(self.use_triton, bool):
            _fail(f"{key}.use_triton", self.use_triton, "True or False")

    @property
    def resolved_divergence(self) -> str:
        """The divergence actually computed: "jsd" at beta 0 / 1 is forward / reverse KL (TRL's convention)."""
        if self.divergence == "jsd" and self.jsd_beta == 0:
            return "forward_kl"
        if self.divergence == "jsd" and self.jsd_beta == 1:
            return "reverse_kl"
        return self.divergence

    @property
    def t2_factor(self) -> float:
        return float(self.temperature) ** 2 if self.scale_by_t2 else 1.0


@dataclass
class KDLossOutput:
    loss: torch.Tensor  # scalar, fp32 (fp64 for fp64 inputs); the only differentiable field
    divergence: torch.Tensor  # scalar, detached: D as it enters the loss (T^2 included when scale_by_t2)
    ce: torch.Tensor  # scalar, detached: student CE at T = 1 (computed even when ce_weight == 0)
    num_tokens: int  # valid tokens (targets != -100)
    top1_agreement: torch.Tensor  # scalar, detached: share of valid tokens where the argmaxes agree (0 if none)


# ------------------------------------------------------------------------------------- KD: the reference


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 and lower precisions, fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


def _check_kd_inputs(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, targets) -> None:
    if student_hidden.shape[:-1] != targets.shape or teacher_hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"kd_loss: student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
            f"{tuple(teacher_hidden.shape)} must be targets {tuple(targets.shape)} + (hidden,)"
        )
    if student_head_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(
            f"kd_loss: student head {tuple(student_head_weight.shape)} vs hidden {student_hidden.shape[-1]}"
        )
    if teacher_head_weight.shape[1] != teacher_hidden.shape[-1]:
        raise ValueError(
            f"kd_loss: teacher head {tuple(teacher_head_weight.shape)} vs hidden {teacher_hidden.shape[-1]}"
        )
    if student_head_weight.shape[0] != teacher_head_weight.shape[0]:
        raise ValueError(
            f"kd_loss: vocabularies differ (student {student_head_weight.shape[0]}, "
            f"teacher {teacher_head_weight.shape[0]}); the student must use the teacher's (padded) vocabulary"
        )


# --------------------------------------------------------------------------------------- KD: the chunks


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim with one transient of x's size (torch.logsumexp makes two)."""
    top = x.amax(-1, keepdim=True)
    return (x - top).exp_().sum(-1).log_().add_(top.squeeze(-1))


def _divergence_(logq: torch.Tensor, logp: torch.Tensor, name: str, beta: float, with_grad: bool):
    """Per-token divergence (n,) and its gradient wrt the student's *tempered* logits (n, V), or None.

    Works in place: `logq` and `logp` (n, V) are scratch afterwards; the gradient reuses logq's storage.
    Closed forms, with q = softmax(student / T), p = softmax(teacher / T), d/dz of a function of q being
    q * (g - <q, g>) for g its gradient wrt q:
      forward KL:  KL(p||q)                 grad = q - p
      reverse KL:  KL(q||p)                 grad = q * (log q - log p - KL(q||p))
      JSD(beta):   g = (1 - beta) log(q/m)  grad = (1 - beta) q * (log(q/m) - KL(q||m))
    """
    if name == "forward_kl":
        p = logp.exp()
        div = logp.sub_(logq).mul_(p).sum(-1)  # sum p (log p - log q)
        grad = logq.exp_().sub_(p) if with_grad else None
    elif name == "reverse_kl":
        q = logq.exp()
        ratio = logq.sub_(logp)  # log q - log p, in logq's storage
        div = torch.mul(q, ratio, out=logp).sum(-1)  # logp is no longer needed: reuse it
        grad = ratio.sub_(div[:, None]).mul_(q) if with_grad else None
    else:
        logm = logq + math.log1p(-beta)
        torch.logaddexp(logm, logp + math.log(beta), out=logm)  # log(beta p + (1 - beta) q)
        p = logp.exp()
        kl_pm = logp.sub_(logm).mul_(p).sum(-1)
        del p
        q = torch.exp(logq, out=logp)  # logp's storage is free again
        ratio = logq.sub_(logm)  # log q - log m, in logq's storage
        del logm
        kl_qm = (q * ratio).sum(-1)
        div = beta * kl_pm + (1 - beta) * kl_qm
        grad = ratio.sub_(kl_qm[:, None]).mul_(q).mul_(1 - beta) if with_grad else None
    return div, grad


def _chunk_terms(student, teacher, targets, cfg: KDLossConfig, coefs, dtype: torch.dtype):
    """One chunk of n valid tokens. `student` / `teacher` = (hidden (n, D), weight, bias) in their matmul dtype.

    Returns per-token D (with T^2), CE and top-1 agreement, and, when `coefs` = (div_coef, ce_coef) is given,
    d(loss)/dz = div_coef * dD/d(z / T) + ce_coef * dCE/dz for the student logits z (n, V), or None.
    CUDA logits go through the fused Triton kernel (train/losses/kd_kernel.py), everything else through the torch
    twin below; both give the same values."""
    if cfg.use_triton and student[0].is_cuda and dtype == torch.float32 and kd_kernel.triton_available():
        div, ce, agree, grad = kd_kernel.kd_chunk_fused(
            F.linear(*student),  # (n, V) in the matmul dtype; the kernel overwrites it with the gradient
            F.linear(*teacher),
            targets,
            cfg.resolved_divergence,
            float(cfg.jsd_beta),
            float(cfg.temperature),
            coefs,
        )
        return div * cfg.t2_factor, ce, agree.bool(), grad
    return _chunk_terms_torch(student, teacher, targets, cfg, coefs, dtype)


def _chunk_terms_torch(student, teacher, targets, cfg: KDLossConfig, coefs, dtype: torch.dtype):
    """`_chunk_terms` with the softmaxes in `dtype`. Each (n, V) tensor is dropped as soon as it is used: at
    most 3 live (4 for JSD, one more with the CE gradient)."""
    temp = float(cfg.temperature)
    need_ce_grad = coefs is not None and coefs[1] != 0
    rows = torch.arange(targets.shape[0], device=targets.device)

    z = F.linear(*student).to(dtype)  # (n, V)
    student_top1 = z.argmax(-1)
    if temp == 1:
        logq = F.log_softmax(z, dim=-1)
        del z
        ce = -logq[rows, targets]
        grad_ce = logq.exp() if need_ce_grad else None  # softmax at T = 1
    else:
        ce = _logsumexp(z) - z[rows, targets]
        grad_ce = torch.softmax(z, dim=-1) if need_ce_grad else None
        logq = F.log_softmax(z.div_(temp), dim=-1)
        del z
    if grad_ce is not None:  # ce_coef * (softmax(z) - onehot(targets))
        grad_ce.mul_(coefs[1])
        grad_ce[rows, targets] -= coefs[1]

    zt = F.linear(*teacher).to(dtype)  # (n, V)
    agree = student_top1 == zt.argmax(-1)
    logp = F.log_softmax(zt.div_(temp) if temp != 1 else zt, dim=-1)
    del zt

    with_div_grad = coefs is not None and coefs[0] != 0
    div, grad = _divergence_(logq, logp, cfg.resolved_divergence, float(cfg.jsd_beta), with_div_grad)
    del logq, logp  # scratch now; `grad` (if any) lives in logq's storage
    if grad is not None:
        grad.mul_(coefs[0])
        if grad_ce is not None:
            grad += grad_ce
    else:
        grad = grad_ce
    return div * cfg.t2_factor, ce, agree, grad


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """What F.linear would compute in: the autocast dtype when autocast is on, else the inputs' common dtype."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and hidden.dtype != torch.float64:  # autocast leaves fp64 alone
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


# One chunk's terms: (rows, h, w, b, coefs, dtype) -> (divergence (n,), CE (n,), agreement (n,), d(loss)/dz (n, V) or
# None), where h (n, D), w, b are the student's in the matmul dtype and `rows` slices the caller's per-token inputs.
ChunkTerms = Callable[[slice, torch.Tensor, torch.Tensor, torch.Tensor | None, tuple | None, torch.dtype], tuple]


def chunked_student_loss(hidden, weight, bias, cfg: KDLossConfig, terms: ChunkTerms, needs) -> tuple[tuple, tuple]:
    """Means over the N valid rows (hidden (N, D)) chunk by chunk, from `terms` of each chunk (the full-vocabulary
    teacher here, cached top-k in kd_topk.py): returns (loss, divergence mean, ce mean, agreement mean) and the
    gradients of loss wrt (hidden, weight, bias) for those flagged in `needs` (None for the others)."""
    n = hidden.shape[0]
    mm_dtype = _matmul_dtype(hidden, weight)
    dtype = _softmax_dtype(mm_dtype)
    denom = max(n, 1)
    need_h, need_w, need_b = needs
    coefs = None
    if any(needs):
        # D enters the loss as kl_weight * mean(t2 * div(z / T)): its gradient wrt z carries 1 / T.
        coefs = (cfg.kl_weight * cfg.t2_factor / cfg.temperature / denom, cfg.ce_weight / denom)
    with torch.autocast(hidden.device.type, enabled=False):  # dtypes chosen explicitly below
        w = weight.to(mm_dtype)
        b = None if bias is None else bias.to(mm_dtype)
        acc_dtype = _softmax_dtype(weight.dtype)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if need_b else None
        sums = torch.zeros(3, dtype=dtype, device=hidden.device)  # D, CE, agreement
        for start in range(0, n, cfg.chunk_tokens):
            rows = slice(start, start + cfg.chunk_tokens)
            h = hidden[rows].to(mm_dtype)  # (n, D)
            div, ce, agree, grad = terms(rows, h, w, b, coefs, dtype)
            sums += torch.stack([div.sum(), ce.sum(), agree.sum().to(dtype)])
            if grad is None:
                continue
            grad = grad.to(mm_dtype)  # (n, V), the dtype autograd would give the matmul
            if need_h:
                grad_h[rows] = grad @ w  # (n, D)
            if need_w:
                if grad_w.dtype == mm_dtype:
                    grad_w.addmm_(grad.T, h)  # (V, D)
                else:  # low-precision matmul as autograd would do it, accumulated over chunks in fp32
                    grad_w += grad.T @ h
            if need_b:
                grad_b += grad.sum(0)
            del grad  # before the next chunk allocates its own
    div_mean, ce_mean, agree_mean = (sums / denom).unbind()
    loss = cfg.kl_weight * div_mean + cfg.ce_weight * ce_mean
    grads = (
        grad_h,
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None else grad_b.to(bias.dtype),
    )
    return (loss, div_mean, ce_mean, agree_mean), grads


class _ChunkedStudentLoss(torch.autograd.Function):
    """The gradients are computed in forward, chunk by chunk; backward scales them by the incoming grad."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, cfg, terms):
        stats, grads = chunked_student_loss(hidden, weight, bias, cfg, terms, ctx.needs_input_grad[:3])
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(*stats[1:])
        return stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_unused):
        grads = (None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
        return (*grads, None, None)


def run_chunked(hidden, weight, bias, cfg: KDLossConfig, terms: ChunkTerms) -> tuple:
    """(loss, divergence, ce, agreement) of `chunked_student_loss`, through autograd when the student needs grads."""
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias)):
        return _ChunkedStudentLoss.apply(hidden, weight, bias, cfg, terms)
    return chunked_student_loss(hidden, weight, bias, cfg, terms, (False,) * 3)[0]


def kd_loss(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head_weight: torch.Tensor,
    targets: torch.Tensor,
    cfg: KDLossConfig,
    student_head_bias: torch.Tensor | None = None,
    teacher_head_bias: torch.Tensor | None = None,
) -> KDLossOutput:
    """Chunked KD loss from final hidden states and lm_head weights (see the module docstring).

    student_hidden (B, T, D) after the final norm, student_head_weight (V, D); teacher_hidden (B, T, D_t),
    teacher_head_weight (V, D_t); targets (B, T) long, -100 where there is no loss, targets[t] being the
    token after position t. Gradients reach the student hidden states, weight and bias; the teacher is a
    constant. Zero valid tokens give a zero loss still connected to the student inputs. Not twice
    differentiable."""
    _check_kd_inputs(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, targets)
    valid = (targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)  # (N,)
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, valid)  # (N, D)
    with torch.no_grad():
        t_hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, valid)  # (N, D_t)
        t_weight = teacher_head_weight.detach()
        t_bias = None if teacher_head_bias is None else teacher_head_bias.detach()
    labels = targets.reshape(-1).index_select(0, valid).long()  # (N,)
    vocab = student_head_weight.shape[0]
    if labels.numel() and not bool(((labels >= 0) & (labels < vocab)).all()):  # one sync; nonzero() made one too
        raise ValueError(
            f"kd_loss: targets must be -100 or token ids in [0, {vocab}); got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    t_mm_dtype = _matmul_dtype(t_hidden, t_weight)
    t_w, t_b = t_weight.to(t_mm_dtype), None if t_bias is None else t_bias.to(t_mm_dtype)

    def terms(rows, h, w, b, coefs, dtype):
        return _chunk_terms((h, w, b), (t_hidden[rows].to(t_mm_dtype), t_w, t_b), labels[rows], cfg, coefs, dtype)

    loss, div, ce, agree = run_chunked(hidden, student_head_weight, student_head_bias, cfg, terms)
    return KDLossOutput(loss=loss, divergence=div, ce=ce, num_tokens=int(valid.numel()), top1_agreement=agree)
