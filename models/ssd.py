"""Pure-PyTorch reference twins of mamba-ssm's Mamba2 Triton ops (CPU path and GPU reference).

Per batch b and head h the state S_t (headdim x dstate) follows the selective SSM recurrence

    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t ⊗ B_t,    y_t = S_t @ C_t + D_h * x_t   (then * silu(z_t))

`ssd_chunk_scan_ref` evaluates it with the chunked SSD algorithm (Mamba2 paper, sec. 6): cut the sequence
into chunks of length L and, with cs = within-chunk cumulative sum of dt*A,
  1. intra-chunk outputs in quadratic form: y_i += sum_{j<=i} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j;
  2. each chunk's own end state: sum_j exp(cs_end - cs_j) dt_j x_j ⊗ B_j;
  3. inter-chunk state passing, a short sequential scan over chunks: S_next = exp(cs_end) S_prev + state_c;
  4. outputs from the carried-in state: y_i += exp(cs_i) C_i . S_prev.
All decays are exponents of non-positive differences (the upper triangle is set to -inf before exp), so
nothing overflows. Packed documents (seq_idx) are handled by masking cross-document pairs in 1./2./4.
and dropping the carried state for chunks that start a new document.
`selective_state_update_ref` is the one-token decoding step; `ssd_recurrence_ref` the plain loop for tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

_DEFAULT_DT_LIMIT = (0.0, float("inf"))


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp64 if any input is fp64 (tight tests), else fp32 (as the Triton kernels accumulate)."""
    is_fp64 = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if is_fp64 else torch.float32


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _process_dt(dt: Tensor, dt_bias: Tensor | None, dt_softplus: bool, dt_limit: tuple[float, float]) -> Tensor:
    """mamba-ssm's dt pipeline: + bias, softplus (threshold 20 = F.softplus default), then clamp."""
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != _DEFAULT_DT_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def document_ids(seq_idx: Tensor) -> Tensor:
    """(batch, seqlen) -> int64 ids counting changes of seq_idx, so the first document is 0 in every row."""
    changes = (seq_idx[:, 1:] != seq_idx[:, :-1]).long()
    return F.pad(changes.cumsum(dim=-1), (1, 0))


def pad_time(t: Tensor, pad: int) -> Tensor:
    """Zero-pad dim 1 (time) at the end."""
    if pad == 0:
        return t
    return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))


def _expand_D(D: Tensor) -> Tensor:
    """D of shape (nheads,) or (nheads, headdim) -> broadcastable against (..., nheads, headdim)."""
    return D[:, None] if D.dim() == 1 else D


def ssd_chunk_scan_ref(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = _DEFAULT_DT_LIMIT,
    return_final_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked SSD scan with the semantics of mamba_ssm's `mamba_chunk_scan_combined`.

    x: (batch, seqlen, nheads, headdim); dt: (batch, seqlen, nheads); A: (nheads,);
    B, C: (batch, seqlen, ngroups, dstate); D: (nheads, headdim) or (nheads,); z: like x; dt_bias: (nheads,);
    initial_states: (batch, nheads, headdim, dstate), feeding only the first document when seq_idx is given;
    seq_idx: (batch, seqlen) ints, the state restarts from zero wherever it changes.
    Returns out (like x, in x's dtype) and, if return_final_states, the state after the last token
    (batch, nheads, headdim, dstate) in the compute dtype (fp32, or fp64 for fp64 inputs), like mamba-ssm.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2:]
    assert nheads % ngroups == 0, "nheads must be a multiple of ngroups"
    assert dt.shape == (batch, seqlen, nheads) and A.shape == (nheads,)
    assert B.shape == C.shape == (batch, seqlen, ngroups, dstate)
    cdtype = compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_states)
    L = chunk_size
    nchunks = math.ceil(seqlen / L)
    pad = nchunks * L - seqlen

    dt = _process_dt(dt.to(cdtype), _cast(dt_bias, cdtype), dt_softplus, dt_limit)
    # Padding with dt = 0 (after the dt pipeline) makes padded tokens identity steps: no decay, no input.
    dt = rearrange(pad_time(dt, pad), "b (c l) (g r) -> b c g r l", l=L, g=ngroups)  # (b, c, g, r, L)
    xc = rearrange(pad_time(x.to(cdtype), pad), "b (c l) (g r) p -> b c l g r p", l=L, g=ngroups)
    Bc = rearrange(pad_time(B.to(cdtype), pad), "b (c l) g n -> b c l g n", l=L)
    Cc = rearrange(pad_time(C.to(cdtype), pad), "b (c l) g n -> b c l g n", l=L)
    A_gr = rearrange(A.to(cdtype), "(g r) -> g r 1", g=ngroups)

    cs = torch.cumsum(dt * A_gr, dim=-1)  # (b, c, g, r, L): log-decay from chunk start to each token
    cs_end = cs[..., -1:]  # (b, c, g, r, 1)

    # Masks: causal within the chunk, and same-document for seq_idx. prev_doc is the document of the token
    # just before each chunk (0 = the first document, the one initial_states belongs to, for chunk 0).
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()  # (L, L)
    if seq_idx is not None:
        doc = document_ids(seq_idx)
        doc = torch.cat([doc, doc[:, -1:].expand(batch, pad)], dim=1)  # padding continues the last document
        doc = rearrange(doc, "b (c l) -> b c l", l=L)  # (b, c, L)
        prev_doc = F.pad(doc[:, :-1, -1], (1, 0))  # (b, c)
        pair_mask = causal & (doc[..., :, None] == doc[..., None, :])  # (b, c, L, L)
        pair_mask = pair_mask[:, :, None, None]  # (b, c, 1, 1, L, L)
        to_end_mask = (doc == doc[..., -1:])[:, :, None, None]  # (b, c, 1, 1, L)
        from_prev_mask = (doc == prev_doc[..., None])[:, :, None, None]  # (b, c, 1, 1, L)
        keeps_carry = (doc[..., -1] == prev_doc)[:, :, None, None]  # (b, c, 1, 1): no boundary in the chunk
    else:
        pair_mask = causal

    # 1. Intra-chunk: decay[i, j] = exp(cs_i - cs_j) for allowed j <= i; -inf elsewhere so exp can't overflow.
    seg = cs[..., :, None] - cs[..., None, :]  # (b, c, g, r, L, L)
    decay = torch.exp(seg.masked_fill(~pair_mask, float("-inf")))
    CB = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc)  # (b, c, g, L, L), shared by the group's heads
    scores = CB[:, :, :, None] * decay * dt[..., None, :]  # (b, c, g, r, L, S)
    y = torch.einsum("bcgrls,bcsgrp->bclgrp", scores, xc)  # (b, c, L, g, r, p)

    # 2. Each chunk's end state from its own tokens (zero start); other documents' tokens never reach the end.
    w_end = torch.exp(cs_end - cs) * dt  # (b, c, g, r, L)
    if seq_idx is not None:
        w_end = w_end * to_end_mask
    chunk_states = torch.einsum("bclgn,bcgrl,bclgrp->bcgrpn", Bc, w_end, xc)  # (b, c, g, r, p, n)

    # 3. Inter-chunk state passing: sequential over chunks (like the Triton kernel), linear in seqlen.
    chunk_decay = torch.exp(cs_end[..., 0])  # (b, c, g, r)
    if seq_idx is not None:
        chunk_decay = chunk_decay * keeps_carry
    if initial_states is not None:
        state = rearrange(initial_states.to(cdtype), "b (g r) p n -> b g r p n", g=ngroups)
    else:
        state = x.new_zeros(batch, ngroups, nheads // ngroups, headdim, dstate, dtype=cdtype)
    carried = []  # state entering each chunk
    for c in range(nchunks):
        carried.append(state)
        state = chunk_decay[:, c, ..., None, None] * state + chunk_states[:, c]
    prev_states = torch.stack(carried, dim=1)  # (b, c, g, r, p, n)

    # 4. Carried-in state seen by each token, decayed from the chunk start; only the same document sees it.
    w_in = torch.exp(cs)  # (b, c, g, r, L)
    if seq_idx is not None:
        w_in = w_in * from_prev_mask
    y = y + torch.einsum("bclgn,bcgrpn,bcgrl->bclgrp", Cc, prev_states, w_in)

    y = rearrange(y, "b c l g r p -> b (c l) (g r) p")[:, :seqlen]  # (b, seqlen, h, p)
    if D is not None:
        y = y + x.to(cdtype) * _expand_D(D.to(cdtype))
    if z is not None:
        y = y * F.silu(z.to(cdtype))
    out = y.to(x.dtype)
    if not return_final_states:
        return out
    return out, rearrange(state, "b g r p n -> b (g r) p n")


def selective_state_update_ref(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = _DEFAULT_DT_LIMIT,
) -> Tensor:
    """One decoding step, mamba_ssm's `selective_state_update`; `state` is updated in place.

    state: (batch, nheads, headdim, dstate); x, dt, z: (batch, nheads, headdim); A: (nheads, headdim, dstate);
    B, C: (batch, ngroups, dstate); D, dt_bias: (nheads, headdim). The head-less layout (state of shape
    (batch, dim, dstate), B/C (batch, dstate), ...) is accepted too, as in mamba-ssm.
    dt_limit is an extension (mamba-ssm's step has none): clamp after softplus when not the default.
    Returns out (batch, nheads, headdim) in x's dtype.
    """
    has_heads = state.dim() == 4
    if not has_heads:  # add a singleton head axis; unsqueeze gives views, so copy_ still updates the caller's
        state, x, dt, B, C = (t.unsqueeze(1) for t in (state, x, dt, B, C))
        A = A.unsqueeze(0)
        D = None if D is None else D.unsqueeze(0)
        z = None if z is None else z.unsqueeze(1)
        dt_bias = None if dt_bias is None else dt_bias.unsqueeze(0)
    batch, nheads, headdim, dstate = state.shape
    ngroups = B.shape[1]
    assert nheads % ngroups == 0, "nheads must be a multiple of ngroups"
    assert x.shape == dt.shape == (batch, nheads, headdim) and A.shape == (nheads, headdim, dstate)
    assert B.shape == C.shape == (batch, ngroups, dstate)
    cdtype = compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)

    dt = _process_dt(dt.to(cdtype), _cast(dt_bias, cdtype), dt_softplus, dt_limit)  # (b, h, p)
    Bh = B.to(cdtype).repeat_interleave(nheads // ngroups, dim=1)  # (b, h, n): head h uses group h // r
    Ch = C.to(cdtype).repeat_interleave(nheads // ngroups, dim=1)
    x_c = x.to(cdtype)
    new_state = state.to(cdtype) * torch.exp(dt[..., None] * A.to(cdtype))
    new_state = new_state + (dt * x_c)[..., None] * Bh[:, :, None, :]  # (b, h, p, n)
    state.copy_(new_state)
    out = torch.einsum("bhpn,bhn->bhp", new_state, Ch)  # from the full-precision state, as the kernel does
    if D is not None:
        out = out + x_c * D.to(cdtype)
    if z is not None:
        out = out * F.silu(z.to(cdtype))
    out = out.to(x.dtype)
    return out if has_heads else out.squeeze(1)


def ssd_recurrence_ref(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int | None = None,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = _DEFAULT_DT_LIMIT,
    return_final_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Token-by-token loop of the recurrence, same arguments as `ssd_chunk_scan_ref` (chunk_size is unused).

    Deliberately naive: test oracle only. The state is zeroed wherever seq_idx changes.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2:]
    cdtype = compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_states)
    out_dtype = x.dtype
    x, A = x.to(cdtype), A.to(cdtype)
    dt = dt.to(cdtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cdtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != _DEFAULT_DT_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    head_group = torch.arange(nheads, device=x.device) // (nheads // ngroups)
    Bh = B.to(cdtype)[:, :, head_group]  # (b, l, h, n)
    Ch = C.to(cdtype)[:, :, head_group]

    if initial_states is None:
        state = x.new_zeros(batch, nheads, headdim, dstate)
    else:
        state = initial_states.to(cdtype)
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            new_doc = seq_idx[:, t] != seq_idx[:, t - 1]  # (b,)
            state = torch.where(new_doc[:, None, None, None], torch.zeros_like(state), state)
        decay = torch.exp(dt[:, t] * A)  # (b, h)
        inp = (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]  # (b, h, p, n)
        state = decay[:, :, None, None] * state + inp
        y = torch.einsum("bhpn,bhn->bhp", state, Ch[:, t])
        if D is not None:
            y = y + x[:, t] * _expand_D(D.to(cdtype))
        if z is not None:
            y = y * F.silu(z[:, t].to(cdtype))
        ys.append(y)
    out = torch.stack(ys, dim=1).to(out_dtype)
    return (out, state) if return_final_states else out
