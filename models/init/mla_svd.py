"""MLA from a GQA attention layer by SVD (X-EcoMLA style), keeping the teacher's RoPE pairs intact.

Each teacher key head is split into a RoPE part and a "nope" part by *rotation pairs*: HF rotates dim j
with dim j + hd/2 at frequency j, so choosing frequency j moves both dims into the student's decoupled
RoPE key, which the student rotates with the teacher's frequency j. Scores on those pairs are exactly
the teacher's at every position. (Splitting dims j < r into RoPE and the rest into nope, as the public
Zebra-Llama code does, cuts pairs in half and changes which frequencies rotate them.)

The nope keys and all values come from one latent: a joint SVD of [W_k,nope; W_v] (stacked per KV
head), truncated to kv_lora_rank, split sqrt(S) to each side. Queries are the teacher's, permuted into
[nope dims, RoPE dims] per head (or an SVD of that when q_lora_rank is set). W_o copies as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import MLAConfig
from ..mixer_mla import MLA
from ..attention_weights import AttentionWeights


@dataclass
class KVFactors:
    """SVD of the stacked [k_nope_g; v_g] rows of every KV head g, in float64."""

    u: torch.Tensor  # (Hkv * (n + hd), m)
    s: torch.Tensor  # (m,)
    vh: torch.Tensor  # (m, D)


def rope_split(head_dim: int, freq_indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rope_dims, nope_dims) of a teacher head: each chosen frequency j brings dims j and j + hd/2."""
    half = head_dim // 2
    idx = torch.tensor(freq_indices, dtype=torch.long)
    rope = torch.cat([idx, idx + half])  # student layout: pair (j, j + r/2) = teacher pair (i, i + hd/2)
    keep = torch.ones(head_dim, dtype=torch.bool)
    keep[rope] = False
    return rope, torch.arange(head_dim)[keep]


def rope_pair_energy(weights: list[AttentionWeights], head_dim: int) -> torch.Tensor:
    """(hd/2,) how much each rotation pair contributes to attention logits, summed over layers and heads:
    ||W_q pair|| * ||W_k pair|| of the query head and its KV head."""
    half = head_dim // 2
    total = torch.zeros(half, dtype=torch.float64)
    for w in weights:
        group = w.q.shape[0] // w.k.shape[0]
        q_norm = w.q.pow(2).sum(-1)  # (H, hd)
        k_norm = w.k.pow(2).sum(-1).repeat_interleave(group, 0)  # (H, hd)
        q_pair = (q_norm[:, :half] + q_norm[:, half:]).sqrt()
        k_pair = (k_norm[:, :half] + k_norm[:, half:]).sqrt()
        total += (q_pair * k_pair).sum(0)
    return total


def choose_rope_pairs(weights: list[AttentionWeights], head_dim: int, rope_dim: int, rule: str) -> list[int]:
    """Teacher frequency indices for the student's RoPE pairs: "uniform" (evenly spaced, like a fresh RoPE of
    rope_dim with the same theta) or "energy" (the pairs that carry the most logit mass in this teacher)."""
    if rule == "uniform":
        return MLAConfig(qk_rope_head_dim=rope_dim).freq_indices(head_dim)
    if rule == "energy":
        top = torch.topk(rope_pair_energy(weights, head_dim), rope_dim // 2).indices
        return sorted(top.tolist())
    raise ValueError(f"student.mla.rope_pairs={rule!r} is invalid: one of 'uniform', 'energy'")


def kv_factors(w: AttentionWeights, nope_dims: torch.Tensor) -> KVFactors:
    stacked = torch.cat([w.k[:, nope_dims], w.v], dim=1).flatten(0, 1)  # (Hkv * (n + hd), D)
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    return KVFactors(u, s, vh)


def energy_rank(s: torch.Tensor, energy: float, multiple: int = 8) -> int:
    """Smallest rank keeping `energy` of the squared singular values, rounded up to a multiple of 8."""
    if not 0 < energy <= 1:
        raise ValueError(f"student.mla.energy={energy} is invalid: a fraction in (0, 1]")
    captured = torch.cumsum(s.pow(2), 0) / s.pow(2).sum()
    rank = int(torch.searchsorted(captured, torch.tensor(energy, dtype=captured.dtype) - 1e-12)) + 1
    return min(-(-rank // multiple) * multiple, len(s))


def _split_sqrt(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int):
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]  # (rows, r), (r, D)


@torch.no_grad()
def init_mla_from_attention(
    mla: MLA, w: AttentionWeights, cfg: MLAConfig, factors: KVFactors | None = None
) -> dict[str, float]:
    """Write the MLA weights from the teacher's; return relative errors of the Q, K and V maps and the
    energy the latent keeps."""
    heads, head_dim, hidden = w.q.shape
    kv_heads = w.k.shape[0]
    rope_dims, nope_dims = rope_split(head_dim, cfg.freq_indices(head_dim))
    order = torch.cat([nope_dims, rope_dims])
    n, rank = len(nope_dims), mla.kv_lora_rank

    def put(param: torch.nn.Parameter | None, value: torch.Tensor | None) -> None:
        if param is not None:
            param.copy_(value.reshape(param.shape).to(param.dtype))

    # Queries: the teacher's heads with dims reordered to [nope, rope].
    q = w.q[:, order].flatten(0, 1)  # (H * hd, D)
    q_bias = None if w.q_bias is None else w.q_bias[:, order].flatten()
    if cfg.q_lora_rank is None:
        put(mla.q_proj.weight, q)
        put(mla.q_proj.bias, q_bias)
        q_err = 0.0
    else:
        up, down = _split_sqrt(*torch.linalg.svd(q, full_matrices=False), cfg.q_lora_rank)
        put(mla.q_a_proj.weight, down)
        put(mla.q_b_proj.weight, up)
        put(mla.q_b_proj.bias, q_bias)
        q_err = ((up @ down - q).norm() / q.norm()).item()
    if w.q_norm is not None and not isinstance(mla.q_norm, torch.nn.Identity):
        put(mla.q_norm.weight, w.q_norm[order])
        put(mla.k_norm.weight, w.k_norm[rope_dims])  # exact only when every dim is RoPE (lossless)

    # RoPE keys: the teacher's pair rows per KV head, or their mean for one shared head.
    k_rope = w.k[:, rope_dims]  # (Hkv, r, D)
    k_rope_bias = None if w.k_bias is None else w.k_bias[:, rope_dims]
    if mla.rope_heads == 1:
        k_rope = k_rope.mean(0, keepdim=True)
        k_rope_bias = None if k_rope_bias is None else k_rope_bias.mean(0, keepdim=True)

    # Latent: joint SVD of [k_nope; v] per KV head.
    factors = factors or kv_factors(w, nope_dims)
    up, down = _split_sqrt(factors.u, factors.s, factors.vh, rank)  # (Hkv*(n+hd), R), (R, D)
    put(mla.kv_a_proj_with_mqa.weight, torch.cat([down, k_rope.flatten(0, 1)]))
    if mla.kv_a_proj_with_mqa.bias is not None:
        put(mla.kv_a_proj_with_mqa.bias, torch.cat([down.new_zeros(rank), k_rope_bias.flatten()]))
    up = up.unflatten(0, (kv_heads, n + head_dim))  # (Hkv, n + hd, R)
    kv_bias = None
    if mla.kv_b_proj.bias is not None:
        kv_bias = torch.cat([w.k_bias[:, nope_dims], w.v_bias], dim=1)  # (Hkv, n + hd)
    if mla.up_heads != kv_heads:  # per-head up-projection: each query head gets its KV head's rows
        up = up.repeat_interleave(mla.up_heads // kv_heads, 0)
        kv_bias = None if kv_bias is None else kv_bias.repeat_interleave(mla.up_heads // kv_heads, 0)
    put(mla.kv_b_proj.weight, up.flatten(0, 1))
    put(mla.kv_b_proj.bias, kv_bias)
    put(mla.o_proj.weight, w.o)
    put(mla.o_proj.bias, w.o_bias)

    # Errors of the maps the student now computes, against the teacher's.
    approx = (up[:: mla.up_heads // kv_heads] if mla.up_heads != kv_heads else up) @ down  # (Hkv, n + hd, D)
    k_full = torch.cat([approx[:, :n], k_rope.expand(kv_heads, -1, -1)], dim=1)
    k_ref = w.k[:, order]
    return {
        "q_rel_err": q_err,
        "k_rel_err": ((k_full - k_ref).norm() / k_ref.norm()).item(),
        "v_rel_err": ((approx[:, n:] - w.v).norm() / w.v.norm()).item(),
        "kv_energy": (factors.s[:rank].pow(2).sum() / factors.s.pow(2).sum()).item(),
        "kv_lora_rank": rank,
    }
