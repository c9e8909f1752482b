"""Fused KD chunk: divergence, CE, agreement and the student-logit gradient in one Triton kernel.

The pure-torch twin is `train.losses._chunk_terms_torch`; `tests/train/test_kd_kernel.py` (CPU, Triton's
interpreter) and `tests/gpu/test_kd_kernel_gpu.py` (compiled, 128K vocabulary) hold this kernel to it.

Why: the torch path turns each (n, V) logits chunk into fp32 and then runs ~10 elementwise passes over it
(softmaxes, exps, products, casts): at V = 128K that is ~20 GB of memory traffic per 4096-token chunk, more
GPU time than the four lm_head matmuls around it. Here one program per row streams the bf16 logits of both
models: pass 1 finds the maxima, log-sum-exps and argmaxes online; pass 2 sums the divergence (and, for
forward KL, writes the gradient); pass 3 writes the gradient for reverse KL and JSD, whose gradients need
the row's divergence first. The gradient overwrites the student logits in place (it is cast to their dtype
for the backward matmuls anyway), so the chunk needs no fp32 (n, V) tensor at all. Arithmetic is fp32.
"""

from __future__ import annotations

import contextlib
import math

import torch

KINDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}


try:
    import triton
    import triton.language as tl

    jit = triton.jit  # module level, once: TRITON_INTERPRET (the CPU test's subprocess) must be set before import
except ImportError:
    triton = tl = None

    def jit(fn):  # without Triton the functions below are never called
        return fn


@jit
def _online_lse(m, s, x, x_max):
    """One tile of a streaming log-sum-exp: running max m and sum s of exp(. - m), updated with tile x."""
    new_m = tl.maximum(m, x_max)
    return new_m, s * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), 0)


@jit
def _tile_log_probs(z_row, zt_row, idx, mask, inv_temp, lseq, lsep):
    """Student logits z (fp32) and the tempered log-probabilities log q, log p of one tile."""
    z = tl.load(z_row + idx, mask=mask, other=0.0).to(tl.float32)
    zt = tl.load(zt_row + idx, mask=mask, other=0.0).to(tl.float32)
    return z, z * inv_temp - lseq, zt * inv_temp - lsep


@jit
def _log_mixture(logp, logq, log_beta, log_1m_beta):
    """log m = log(beta p + (1 - beta) q), as a stable logaddexp."""
    a = logp + log_beta
    b = logq + log_1m_beta
    return tl.maximum(a, b) + tl.log(1.0 + tl.exp(-tl.abs(a - b)))


@jit
def _ce_grad(z, lse1, idx, target):
    """d CE / dz = softmax(z) - onehot(target), at T = 1."""
    return tl.exp(z - lse1) - (idx == target).to(tl.float32)


@jit
def _kd_chunk_kernel(
    z_ptr,  # (n, V) student logits; overwritten with d(loss)/dz when WRITE_GRAD
    zt_ptr,  # (n, V) teacher logits
    target_ptr,  # (n,) int64
    div_ptr,  # (n,) fp32: per-token divergence (no T^2)
    ce_ptr,  # (n,) fp32: student CE at T = 1
    agree_ptr,  # (n,) fp32: 1 where the argmaxes agree
    V,
    stride_z,
    stride_zt,
    inv_temp,
    log_beta,
    log_1m_beta,
    beta,
    div_coef,
    ce_coef,
    KIND: tl.constexpr,  # 0 forward KL, 1 reverse KL, 2 JSD
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    zt_row = zt_ptr + row * stride_zt
    target = tl.load(target_ptr + row)
    cols = tl.arange(0, BLOCK)
    neg_inf = float("-inf")

    # Pass 1: online max and sum of exp for z (T = 1, CE), z / T and zt / T; argmax of z and zt.
    m1 = neg_inf
    s1 = 0.0
    mq = neg_inf
    sq = 0.0
    mp = neg_inf
    sp = 0.0
    best_z = neg_inf
    arg_z = 0
    best_t = neg_inf
    arg_t = 0
    for start in range(0, V, BLOCK):
        idx = start + cols
        mask = idx < V
        z = tl.load(z_row + idx, mask=mask, other=neg_inf).to(tl.float32)
        zt = tl.load(zt_row + idx, mask=mask, other=neg_inf).to(tl.float32)
        tile_max = tl.max(z, 0)
        tile_arg = tl.argmax(z, 0)
        if tile_max > best_z:  # strict: the first maximum wins, as torch.argmax
            best_z = tile_max
            arg_z = start + tile_arg
        tile_max_t = tl.max(zt, 0)
        tile_arg_t = tl.argmax(zt, 0)
        if tile_max_t > best_t:
            best_t = tile_max_t
            arg_t = start + tile_arg_t
        m1, s1 = _online_lse(m1, s1, z, tile_max)
        mq, sq = _online_lse(mq, sq, z * inv_temp, tile_max * inv_temp)
        mp, sp = _online_lse(mp, sp, zt * inv_temp, tile_max_t * inv_temp)
    lse1 = m1 + tl.log(s1)
    lseq = mq + tl.log(sq)
    lsep = mp + tl.log(sp)
    z_target = tl.load(z_row + target).to(tl.float32)
    tl.store(ce_ptr + row, lse1 - z_target)
    tl.store(agree_ptr + row, (arg_z == arg_t).to(tl.float32))

    # Pass 2: the divergence; forward KL's gradient q - p needs nothing more, so it is written here.
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc_qm = tl.zeros([BLOCK], dtype=tl.float32)  # JSD: KL(q || m), which its gradient needs
    for start in range(0, V, BLOCK):
        idx = start + cols
        mask = idx < V
        z, logq, logp = _tile_log_probs(z_row, zt_row, idx, mask, inv_temp, lseq, lsep)
        q = tl.exp(logq)
        p = tl.exp(logp)
        if KIND == 0:
            acc += tl.where(mask, p * (logp - logq), 0.0)
            if WRITE_GRAD:
                grad = div_coef * (q - p) + ce_coef * _ce_grad(z, lse1, idx, target)
                tl.store(z_row + idx, grad.to(z_ptr.dtype.element_ty), mask=mask)
        elif KIND == 1:
            acc += tl.where(mask, q * (logq - logp), 0.0)
        else:
            logm = _log_mixture(logp, logq, log_beta, log_1m_beta)
            acc += tl.where(mask, p * (logp - logm), 0.0)
            acc_qm += tl.where(mask, q * (logq - logm), 0.0)
    if KIND == 2:
        kl_qm = tl.sum(acc_qm, 0)
        div = beta * tl.sum(acc, 0) + (1.0 - beta) * kl_qm
    else:
        kl_qm = 0.0
        div = tl.sum(acc, 0)
    tl.store(div_ptr + row, div)

    # Pass 3 (reverse KL, JSD): gradients that subtract the row's divergence.
    if KIND != 0 and WRITE_GRAD:
        for start in range(0, V, BLOCK):
            idx = start + cols
            mask = idx < V
            z, logq, logp = _tile_log_probs(z_row, zt_row, idx, mask, inv_temp, lseq, lsep)
            q = tl.exp(logq)
            if KIND == 1:
                grad = q * (logq - logp - div)
            else:
                grad = (1.0 - beta) * q * (logq - _log_mixture(logp, logq, log_beta, log_1m_beta) - kl_qm)
            grad = div_coef * grad + ce_coef * _ce_grad(z, lse1, idx, target)
            tl.store(z_row + idx, grad.to(z_ptr.dtype.element_ty), mask=mask)


def triton_available() -> bool:
    return triton is not None


def kd_chunk_fused(
    z: torch.Tensor,
    zt: torch.Tensor,
    targets: torch.Tensor,
    divergence: str,
    beta: float,
    temperature: float,
    coefs: tuple[float, float] | None,
    block: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Student logits z (n, V) and teacher logits zt (n, V), any float dtype, rows contiguous.

    Returns per-token divergence (no T^2 factor), CE at T = 1 and top-1 agreement, all fp32 (n,), and, when
    `coefs` = (div_coef, ce_coef) is given, d(loss)/dz = div_coef * dD/d(z / T) + ce_coef * dCE/dz written
    into z's storage (z itself is returned); None otherwise. `divergence` is the resolved one: "jsd" needs
    0 < beta < 1."""
    if triton is None:
        raise RuntimeError("kd_chunk_fused needs Triton (pip install triton); the torch path needs nothing")
    if z.shape != zt.shape or z.stride(-1) != 1 or zt.stride(-1) != 1:
        raise ValueError(f"kd_chunk_fused: z {tuple(z.shape)} and zt {tuple(zt.shape)} must match, rows contiguous")
    n, vocab = z.shape
    div, ce, agree = (torch.empty(n, dtype=torch.float32, device=z.device) for _ in range(3))
    kind = KINDS[divergence]
    if kind == 2 and not 0 < beta < 1:
        raise ValueError(f"kd_chunk_fused: jsd needs 0 < beta < 1, got {beta} (0 / 1 resolve to forward / reverse KL)")
    div_coef, ce_coef = coefs if coefs is not None else (0.0, 0.0)
    if n == 0:
        return div, ce, agree, (z if coefs is not None else None)
    with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():  # Triton launches on the current one
        _kd_chunk_kernel[(n,)](
            z,
            zt,
            targets.contiguous(),
            div,
            ce,
            agree,
            vocab,
            z.stride(0),
            zt.stride(0),
            1.0 / float(temperature),
            math.log(beta) if kind == 2 else 0.0,
            math.log1p(-beta) if kind == 2 else 0.0,
            float(beta),
            float(div_coef),
            float(ce_coef),
            KIND=kind,
            WRITE_GRAD=coefs is not None,
            BLOCK=block,
            num_warps=8 if block >= 2048 else 4,
        )
    return div, ce, agree, (z if coefs is not None else None)
