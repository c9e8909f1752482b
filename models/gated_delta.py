"""The gated delta rule (Gated DeltaNet, Yang et al. 2024): pure-torch references and fla's Triton kernel on CUDA.

Per batch row and head, with unit-norm key k_t and query q_t (K), value v_t (V), decay alpha_t = exp(g_t) in (0, 1]
and write strength beta_t in (0, 1), the state h (K x V, fla's layout, so a cache feeds fla's kernels directly;
the paper's S_t is h_t^T) follows

    h_t = alpha_t (I - beta_t k_t k_t^T) h_{t-1} + beta_t k_t v_t^T,        o_t = scale * h_t^T q_t

Step form (decoding): u_t = beta_t (v_t - (alpha_t h_{t-1})^T k_t), the prediction error written back, and
h_t = alpha_t h_{t-1} + k_t u_t^T.

Chunked form (the WY / UT transform of fla's chunk_gated_delta_rule): in a chunk of L tokens with cumulative log
decay c_i from the chunk start and carried-in state h0, the written values U (L x V) solve the unit lower-triangular
system
    (I + A) U = diag(beta) V - diag(beta exp(c)) K h0,      A_ij = beta_i exp(c_i - c_j) k_i . k_j   (j < i)
so U = U0 - W h0 with U0 = (I + A)^-1 diag(beta) V and W = (I + A)^-1 diag(beta exp(c)) K, solved for every chunk
at once. Then, sequentially over chunks and through small products only,
    O   = scale [(Q K^T ⊙ D) U + diag(exp(c)) Q h0],     D_ij = exp(c_i - c_j)   (j <= i)
    h_L = exp(c_L) h0 + K^T diag(exp(c_L - c)) U.
Every exponent is a non-positive difference (the upper triangle is -inf before exp), so nothing overflows.
Packed documents (seq_idx): A and D are masked across documents, only tokens of the carried-in state's document
read h0, only the last document's tokens reach h_L, and h0 reaches h_L only when the chunk has no boundary.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .ssd import compute_dtype, document_ids, pad_time


def gated_delta_rule_chunk_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    chunk_size: int = 64,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    seq_idx: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked gated delta rule. q, k: (B, T, H, K) (unit norm: the caller normalizes); v: (B, T, H, V);
    g (log decay, <= 0) and beta: (B, T, H); initial_state: (B, H, K, V), feeding only the first document when
    seq_idx (B, T) is given (the state restarts wherever it changes).
    Returns o (B, T, H, V) in v's dtype and, with return_final_state, the state after the last token in the compute
    dtype (fp32, or fp64 for fp64 inputs)."""
    batch, length, heads, dk = q.shape
    dv, out_dtype = v.shape[-1], v.dtype
    cdtype = compute_dtype(q, k, v, g, beta, initial_state)
    L = chunk_size
    nchunks = math.ceil(length / L)
    pad = nchunks * L - length

    # Padded tokens have g = 0 and beta = 0: identity steps (no decay, nothing written, nothing read).
    def chunks(t: Tensor) -> Tensor:
        return rearrange(pad_time(t.to(cdtype), pad), "b (c l) h ... -> b h c l ...", l=L)

    q, k, v, g, beta = (chunks(t) for t in (q, k, v, g, beta))  # (b, h, c, L, K|V) and (b, h, c, L)
    cs = torch.cumsum(g, dim=-1)  # (b, h, c, L): log decay from the chunk start through each token
    cs_end = cs[..., -1:]  # (b, h, c, 1)

    strict = torch.ones(L, L, dtype=torch.bool, device=q.device).tril(-1)
    inclusive = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    ones = torch.ones((), dtype=cdtype, device=q.device)
    from_prev, to_end, keeps_carry = ones, ones, ones
    if seq_idx is not None:
        doc = document_ids(seq_idx)
        doc = torch.cat([doc, doc[:, -1:].expand(batch, pad)], dim=1)  # padding continues the last document
        doc = rearrange(doc, "b (c l) -> b c l", l=L)[:, None]  # (b, 1, c, L)
        prev_doc = F.pad(doc[..., :-1, -1], (1, 0))  # (b, 1, c): document of the token before each chunk
        same = doc[..., :, None] == doc[..., None, :]  # (b, 1, c, L, L)
        strict, inclusive = strict & same, inclusive & same
        from_prev = (doc == prev_doc[..., None]).to(cdtype)  # (b, 1, c, L): reads the carried-in state
        to_end = (doc == doc[..., -1:]).to(cdtype)  # (b, 1, c, L): reaches the chunk's end state
        keeps_carry = (doc[..., -1] == prev_doc).to(cdtype)  # (b, 1, c): no boundary inside the chunk

    seg = cs[..., :, None] - cs[..., None, :]  # (b, h, c, L, L)
    decay_strict = torch.exp(seg.masked_fill(~strict, float("-inf")))
    decay_inclusive = torch.exp(seg.masked_fill(~inclusive, float("-inf")))
    eye = torch.eye(L, dtype=cdtype, device=q.device)
    system = eye + beta[..., :, None] * decay_strict * (k @ k.transpose(-1, -2))  # I + A: (b, h, c, L, L)
    rhs = torch.cat([beta[..., None] * v, (beta * torch.exp(cs) * from_prev)[..., None] * k], dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u0, w = solved.split([dv, dk], dim=-1)  # (b, h, c, L, V), (b, h, c, L, K)

    scores = (q @ k.transpose(-1, -2)) * decay_inclusive  # (b, h, c, L, L)
    out0 = scores @ u0  # (b, h, c, L, V): the output with h0 = 0
    q_state = (torch.exp(cs) * from_prev)[..., None] * q - scores @ w  # (b, h, c, L, K): the output's h0 reader
    k_end = (torch.exp(cs_end - cs) * to_end)[..., None] * k  # (b, h, c, L, K)
    carry = (torch.exp(cs_end[..., 0]) * keeps_carry)[..., None, None]  # (b, h, c, 1, 1)
    state_map = carry * torch.eye(dk, dtype=cdtype, device=q.device) - k_end.transpose(-1, -2) @ w  # (.., K, K)
    state_add = k_end.transpose(-1, -2) @ u0  # (b, h, c, K, V)

    if initial_state is not None:
        state = initial_state.to(cdtype)
    else:
        state = q.new_zeros(batch, heads, dk, dv)
    outs = []
    for c in range(nchunks):  # sequential over chunks only, like fla's state-passing kernel
        outs.append(out0[:, :, c] + q_state[:, :, c] @ state)
        state = state_map[:, :, c] @ state + state_add[:, :, c]
    o = scale * torch.stack(outs, dim=2)  # (b, h, c, L, V)
    o = rearrange(o, "b h c l v -> b (c l) h v")[:, :length].to(out_dtype)
    return (o, state) if return_final_state else o


def gated_delta_rule_step_ref(
    state: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float = 1.0
) -> Tensor:
    """One decoding step; `state` (B, H, K, V) is updated in place. q, k: (B, H, K); v: (B, H, V); g, beta: (B, H).
    Returns o (B, H, V) in v's dtype, read from the full-precision state."""
    cdtype, out_dtype = compute_dtype(state, q, k, v, g, beta), v.dtype
    q, k, v, g, beta = (t.to(cdtype) for t in (q, k, v, g, beta))
    h = state.to(cdtype) * torch.exp(g)[..., None, None]
    written = beta[..., None] * (v - torch.einsum("bhkv,bhk->bhv", h, k))  # the prediction error, scaled
    h = h + k[..., :, None] * written[..., None, :]
    state.copy_(h)
    return (scale * torch.einsum("bhkv,bhk->bhv", h, q)).to(out_dtype)


def gated_delta_rule_recurrent_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    chunk_size: int | None = None,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    seq_idx: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The token-by-token recurrence written as the paper states it, S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T)
    + beta_t v_t k_t^T, o_t = scale S_t q_t (S = h^T), with the arguments of `gated_delta_rule_chunk_ref`
    (chunk_size unused). Deliberately naive: the test oracle. The state is zeroed wherever seq_idx changes."""
    batch, length, heads, dk = q.shape
    out_dtype = v.dtype
    cdtype = compute_dtype(q, k, v, g, beta, initial_state)
    q, k, v, g, beta = (t.to(cdtype) for t in (q, k, v, g, beta))
    eye = torch.eye(dk, dtype=cdtype, device=q.device)
    if initial_state is None:
        s = q.new_zeros(batch, heads, v.shape[-1], dk)
    else:
        s = initial_state.to(cdtype).transpose(-1, -2)  # (b, h, V, K)
    outs = []
    for t in range(length):
        if seq_idx is not None and t > 0:
            new_doc = (seq_idx[:, t] != seq_idx[:, t - 1])[:, None, None, None]
            s = torch.where(new_doc, torch.zeros_like(s), s)
        kt, bt = k[:, t], beta[:, t][..., None, None]  # (b, h, K), (b, h, 1, 1)
        erase = eye - bt * (kt[..., :, None] * kt[..., None, :])  # (b, h, K, K)
        s = torch.exp(g[:, t])[..., None, None] * (s @ erase) + bt * (v[:, t][..., :, None] * kt[..., None, :])
        outs.append(scale * (s @ q[:, t][..., None])[..., 0])  # (b, h, V)
    o = torch.stack(outs, dim=1).to(out_dtype)
    return (o, s.transpose(-1, -2)) if return_final_state else o


# ------------------------------------------------------------------------------------------------- CUDA: fla


@cache
def fla_chunk_gated_delta_rule() -> Callable | None:
    """fla's `chunk_gated_delta_rule` (PyPI `fla-core`, Triton), or None when it or triton cannot be imported.
    Imported by name so that the exported student's code names no optional package (transformers checks them)."""
    try:
        return importlib.import_module("fla.ops.gated_delta_rule").chunk_gated_delta_rule
    except ImportError:
        return None


@cache
def fla_backward_known_bad() -> bool:
    """fla 0.6 refuses its gated backward on Hopper under Triton 3.4 - 3.7.0 (a Triton miscompile, fla issue #640)
    unless tilelang is installed (measured: H100, Triton 3.6). Training there runs the torch reference on CUDA;
    calls without autograd keep fla's kernel."""
    try:
        triton = importlib.import_module("triton")
    except ImportError:
        return False
    version = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:3])
    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
    tilelang = importlib.util.find_spec("tilelang") is not None
    return hopper and (3, 4, 0) <= version < (3, 7, 1) and not tilelang


def use_fla(tensor: Tensor) -> bool:
    """Whether a call on `tensor` can run fla's kernel: CUDA, fla importable, and a backward fla will run if autograd
    records."""
    if not tensor.is_cuda or fla_chunk_gated_delta_rule() is None:
        return False
    return not (torch.is_grad_enabled() and fla_backward_known_bad())


def gated_delta_rule_fla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    chunk_size: int = 64,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    seq_idx: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """`gated_delta_rule_chunk_ref`'s contract through fla's kernel (its own chunk size, 64). Packed rows become
    one varlen sequence per document (fla's cu_seqlens over the flattened batch): the row's initial state feeds
    its first document, and the final state is the row's last document's."""
    kernel = fla_chunk_gated_delta_rule()
    if kernel is None:
        raise RuntimeError("fla's chunk_gated_delta_rule is not importable: pip install fla-core (needs triton)")
    beta = beta.to(q.dtype)
    g = g.float()
    if initial_state is not None:
        initial_state = initial_state.float()
    if seq_idx is None:
        o, state = kernel(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=return_final_state
        )
        return (o, state) if return_final_state else o
    batch, length = seq_idx.shape
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    flat = starts.flatten()
    cu_seqlens = F.pad(flat.nonzero()[:, 0], (0, 1), value=batch * length)  # one host sync per call
    doc_of = (flat.cumsum(0) - 1).view(batch, length)  # sequence number of every token
    if initial_state is not None:
        per_doc = initial_state.new_zeros(len(cu_seqlens) - 1, *initial_state.shape[1:])
        per_doc[doc_of[:, 0]] = initial_state
        initial_state = per_doc
    flat_inputs = (t.flatten(0, 1)[None] for t in (q, k, v, g, beta))
    o, state = kernel(
        *flat_inputs,
        scale=scale,
        initial_state=initial_state,
        output_final_state=return_final_state,
        cu_seqlens=cu_seqlens,
    )
    o = o.view(batch, length, *o.shape[2:])
    return (o, state[doc_of[:, -1]]) if return_final_state else o
