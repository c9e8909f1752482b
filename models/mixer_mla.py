"""Multi-head latent attention (MLA), one module for training, prefill and absorbed decoding.

Per token, keys and values come from one low-rank latent c = W_dkv h (kv_lora_rank values) plus a small
decoupled RoPE key k_pe (rope heads x qk_rope_head_dim). Scores are q_nope . k_nope + q_pe . k_pe with
k_nope, v = W_ukv c, up-projected either per teacher KV head and shared by its query group ("gqa", the
shape SVD of a GQA teacher produces) or per head. Only c and the rotated k_pe are cached.

Training and prefill decompress the call's own latents and run SDPA. With cached tokens (decoding) the
up-projections are absorbed instead: queries move into latent space (q_nope W_uk), attend over the cached
latents directly, and the latent-space output is mapped by W_uv; the cache is never decompressed.
Parameter names follow DeepSeek-V2 (q_proj / q_a_proj / q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj).

Initialization from a GQA attention layer by SVD (X-EcoMLA style), keeping the teacher's RoPE pairs intact.

Each teacher key head is split into a RoPE part and a "nope" part by *rotation pairs*: HF rotates dim j
with dim j + hd/2 at frequency j, so choosing frequency j moves both dims into the student's decoupled
RoPE key, which the student rotates with the teacher's frequency j. Scores on those pairs are exactly
the teacher's at every position. (Splitting dims j < r into RoPE and the rest into nope, as the public
Zebra-Llama code does, cuts pairs in half and changes which frequencies rotate them.)

The nope keys and all values come from one latent: a joint SVD of [W_k,nope; W_v] (stacked per KV
head), truncated to kv_lora_rank, split sqrt(S) to each side. Queries are the teacher's, permuted into
[nope dims, RoPE dims] per head (or an SVD of that when q_lora_rank is set). W_o copies as is.

The MLA mixer kind, top to bottom: settings (MLAConfig), cache slot, module, initialization from attention,
settings from a teacher, and the registry entry MLA_KIND (models/mixer_kind.py says what each entry is).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .attention_weights import AttentionWeights
from .documents import Documents
from .mixer_kind import CacheBytes, CacheRequest, InitOptions, MixerKind, config_from_dict
from .norm import RMSNorm
from .rope import apply_rope

if TYPE_CHECKING:
    from .config import HybridConfig
    from .teacher_spec import TeacherSpec

NAME = "mla"  # HybridConfig.mixer_types entry and settings key (config.json "mla", student.mla); never renamed


ROPE_HEADS = ("shared", "per_kv_head")  # mla.rope_heads: one RoPE key head (DeepSeek) or one per teacher KV head
KV_UP_LAYOUTS = ("gqa", "per_head")  # mla.kv_up_layout: an up-projection per teacher KV head, or per query head
ROPE_PAIRS = ("energy", "uniform")  # student.mla.rope_pairs: which teacher frequencies stay RoPE


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2 style, X-EcoMLA initializable).

    Per token the cache holds the latent (`kv_lora_rank`) plus `num_rope_heads * qk_rope_head_dim`
    RoPE key values; keys' nope part and values are up-projected from the latent.
    """

    kv_lora_rank: int = 128
    # Per-layer latent ranks (index = layer; entries of Mamba2 layers unused), e.g. from the energy rule.
    kv_lora_ranks: list[int] | None = None
    q_lora_rank: int | None = None  # None: full-rank q_proj (as in Zebra-Llama 1B/3B)
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    # "shared": one RoPE key head for all query heads (DeepSeek); "per_kv_head": one per teacher KV head.
    rope_heads: str = "shared"
    # "gqa": one up-projection per teacher KV head, repeated over its query group; "per_head": one per head.
    kv_up_layout: str = "gqa"
    latent_norm: bool = False  # RMSNorm on the KV latent (DeepSeek has it; SVD init is exact without it)
    q_latent_norm: bool = False  # RMSNorm on the query latent when q_lora_rank is set
    qkv_bias: bool = False  # teacher q/k/v biases (Qwen2) land on q, the RoPE key and the up-projection
    o_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on queries and RoPE keys before rotation (Qwen3)
    softmax_scale: float | None = None  # None: 1/sqrt(qk_nope_head_dim + qk_rope_head_dim)
    # Which of the teacher's head_dim/2 rotation frequencies the rope_dim/2 student pairs use.
    # None: evenly spaced, which for plain RoPE equals a fresh RoPE of qk_rope_head_dim with the same theta.
    rope_freq_indices: list[int] | None = None
    lossless: bool = False  # set by the init code; documents that dims were chosen to reproduce the teacher

    def validate(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        def bad(key: str, value: Any, allowed: str) -> ValueError:
            return ValueError(f"mla.{key}={value!r} is invalid: {allowed}")

        if self.kv_lora_rank < 1:
            raise bad("kv_lora_rank", self.kv_lora_rank, "must be >= 1")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise bad("q_lora_rank", self.q_lora_rank, "must be >= 1 or null")
        if self.qk_rope_head_dim < 2 or self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", self.qk_rope_head_dim, "must be an even number >= 2")
        if self.qk_rope_head_dim > head_dim:
            raise bad("qk_rope_head_dim", self.qk_rope_head_dim, f"must be <= the teacher head_dim {head_dim}")
        if self.qk_nope_head_dim < 0 or self.v_head_dim < 1:
            raise bad("qk_nope_head_dim/v_head_dim", (self.qk_nope_head_dim, self.v_head_dim), "must be >= 0 / >= 1")
        if self.rope_heads not in ROPE_HEADS:
            raise bad("rope_heads", self.rope_heads, "one of " + ", ".join(map(repr, ROPE_HEADS)))
        if self.kv_up_layout not in KV_UP_LAYOUTS:
            raise bad("kv_up_layout", self.kv_up_layout, "one of " + ", ".join(map(repr, KV_UP_LAYOUTS)))
        if num_heads % num_kv_heads:
            raise bad("num_kv_heads", num_kv_heads, f"must divide num_attention_heads={num_heads}")
        if self.rope_freq_indices is not None:
            idx = list(self.rope_freq_indices)
            if len(idx) != self.qk_rope_head_dim // 2 or not all(0 <= i < head_dim // 2 for i in idx):
                raise bad(
                    "rope_freq_indices",
                    idx,
                    f"need {self.qk_rope_head_dim // 2} indices in [0, {head_dim // 2})",
                )

    def rank(self, layer_idx: int) -> int:
        if self.kv_lora_ranks is not None and self.kv_lora_ranks[layer_idx]:
            return int(self.kv_lora_ranks[layer_idx])
        return self.kv_lora_rank

    def num_rope_heads(self, num_kv_heads: int) -> int:
        return 1 if self.rope_heads == "shared" else num_kv_heads

    def num_up_heads(self, num_heads: int, num_kv_heads: int) -> int:
        return num_kv_heads if self.kv_up_layout == "gqa" else num_heads

    def freq_indices(self, head_dim: int) -> list[int]:
        if self.rope_freq_indices is not None:
            return list(self.rope_freq_indices)
        step = head_dim / self.qk_rope_head_dim
        return [int(math.floor(j * step)) for j in range(self.qk_rope_head_dim // 2)]


@dataclass
class MLALayerCache:
    latent: torch.Tensor | None = None  # (B, S, kv_lora_rank)
    rope_key: torch.Tensor | None = None  # (B, S, rope_heads, qk_rope_head_dim), already rotated
    # Preallocated mode: the model's shared 0-d device counter of tokens written (S above is then max_length).
    position: torch.Tensor | None = None

    def update(self, latent: torch.Tensor, rope_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this call's tokens; return everything cached so far (preallocated: the whole buffers)."""
        if self.position is not None:
            index = self.position + torch.arange(latent.shape[1], device=latent.device)
            self.latent.index_copy_(1, index, latent.to(self.latent.dtype))
            self.rope_key.index_copy_(1, index, rope_key.to(self.rope_key.dtype))
        elif self.latent is None:
            self.latent, self.rope_key = latent, rope_key
        else:
            self.latent = torch.cat([self.latent, latent], dim=1)
            self.rope_key = torch.cat([self.rope_key, rope_key], dim=1)
        return self.latent, self.rope_key

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.latent, self.rope_key) if t is not None]

    def reorder(self, index: torch.Tensor) -> None:
        if self.latent is not None:
            self.latent = self.latent.index_select(0, index.to(self.latent.device))
            self.rope_key = self.rope_key.index_select(0, index.to(self.rope_key.device))


class MLA(nn.Module):
    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        c = config.mixer_settings(NAME)
        self.num_heads = config.num_attention_heads
        self.up_heads = c.num_up_heads(config.num_attention_heads, config.num_key_value_heads)
        self.rope_heads = c.num_rope_heads(config.num_key_value_heads)
        self.kv_lora_rank = c.rank(layer_idx)
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        qk_dim = self.nope_dim + self.rope_dim
        self.scale = c.softmax_scale or qk_dim**-0.5
        self.freq_indices = c.freq_indices(config.head_dim)
        self._freq_index: dict[torch.device, torch.Tensor] = {}  # per device; not a buffer (see models/rope.py)
        hidden, eps = config.hidden_size, config.rms_norm_eps

        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, self.num_heads * qk_dim, bias=c.qkv_bias)
        else:
            self.q_a_proj = nn.Linear(hidden, c.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, eps) if c.q_latent_norm else nn.Identity()
            self.q_b_proj = nn.Linear(c.q_lora_rank, self.num_heads * qk_dim, bias=c.qkv_bias)
        self.kv_a_proj_with_mqa = nn.Linear(
            hidden, self.kv_lora_rank + self.rope_heads * self.rope_dim, bias=c.qkv_bias
        )
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps) if c.latent_norm else nn.Identity()
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.up_heads * (self.nope_dim + self.v_dim), bias=c.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, hidden, bias=c.o_bias)
        self.q_norm = RMSNorm(qk_dim, eps) if c.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.rope_dim, eps) if c.qk_norm else nn.Identity()

    def _queries(self, hidden: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(hidden)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))

    def _layer_freqs(self, table: torch.Tensor) -> torch.Tensor:
        """This layer's RoPE frequencies out of the teacher's table (B, T, head_dim/2).

        The index tensor is made once per device: indexing with a Python list copies it host-to-device on every
        call, which a CUDA graph cannot capture (the first call, a prefill or warmup, runs outside capture).
        """
        index = self._freq_index.get(table.device)
        if index is None:
            index = self._freq_index[table.device] = torch.tensor(self.freq_indices, device=table.device)
        return table.index_select(-1, index)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        docs: Documents,
        cache: MLALayerCache | None = None,
        absorb: bool | None = None,
    ) -> torch.Tensor:
        """hidden (B, T, D); cos/sin (B, T, head_dim/2) over the teacher's full frequency table.

        `absorb=None` decodes in absorbed form whenever cached tokens exist; True/False forces a form.
        """
        batch, length, _ = hidden.shape
        cos, sin = self._layer_freqs(cos), self._layer_freqs(sin)
        q = self.q_norm(self._queries(hidden).unflatten(-1, (self.num_heads, -1)))  # (B, T, H, nope+rope)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        latent, k_pe = self.kv_a_proj_with_mqa(hidden).split(
            [self.kv_lora_rank, self.rope_heads * self.rope_dim], dim=-1
        )
        latent = self.kv_a_layernorm(latent)  # (B, T, r)
        k_pe = apply_rope(self.k_norm(k_pe.unflatten(-1, (self.rope_heads, self.rope_dim))), cos, sin)
        query_start = None
        if cache is not None:
            cached = cache.update(latent, k_pe)  # (B, S, r), (B, S, R, rope)
            # An empty cache adds no keys: prefill attends over its own tokens (not a preallocated buffer's slots).
            if docs.past_len > 0:
                latent, k_pe = cached
                query_start = cache.position  # None for a growing cache; a device counter for a preallocated one
        if docs.block_mask is not None and cache is None:  # packed documents, FlexAttention (models/documents.py)
            return self.o_proj(self._expanded(q_nope, q_pe, latent, k_pe, docs.block_mask).flatten(-2))
        mask = attention_mask(docs, length, latent.shape[1], query_start)
        if absorb is None:
            absorb = docs.past_len > 0
        attend = self._absorbed if absorb else self._expanded
        out = attend(q_nope, q_pe, latent, k_pe, mask)  # (B, T, H, v)
        return self.o_proj(out.flatten(-2))

    def _expanded(self, q_nope, q_pe, latent, k_pe, mask) -> torch.Tensor:
        """Decompress keys/values for the latents given and run SDPA (training and prefill)."""
        kv = self.kv_b_proj(latent).unflatten(-1, (self.up_heads, -1))  # (B, S, U, nope+v)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_pe = (
            k_pe.repeat_interleave(self.up_heads // self.rope_heads, dim=2)
            if self.up_heads >= self.rope_heads
            else k_pe
        )
        if self.rope_heads > self.up_heads:  # per-KV-head RoPE keys with a shared up-projection
            k_nope = k_nope.repeat_interleave(self.rope_heads // self.up_heads, dim=2)
            v = v.repeat_interleave(self.rope_heads // self.up_heads, dim=2)
        k = torch.cat([k_nope, k_pe.to(k_nope.dtype)], dim=-1)  # (B, S, K, nope+rope)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, T, H, nope+rope)
        if isinstance(mask, BlockMask):
            dtype = v.dtype  # FlexAttention is not autocast-aware: one dtype for q, k, v (SDPA's autocast does this)
            out = flex_attention_kernel(q.device)(
                q.transpose(1, 2).to(dtype),
                k.transpose(1, 2).to(dtype),
                v.transpose(1, 2),
                block_mask=mask,
                scale=self.scale,
                enable_gqa=k.shape[2] != self.num_heads,
            )
            return out.transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
            enable_gqa=k.shape[2] != self.num_heads,
        )
        return out.transpose(1, 2)

    def _absorbed(self, q_nope, q_pe, latent, k_pe, mask) -> torch.Tensor:
        """Attend in latent space: q_nope W_uk against cached latents, output mapped by W_uv."""
        batch, length, heads, _ = q_nope.shape
        group = heads // self.up_heads
        weight = self.kv_b_proj.weight.unflatten(0, (self.up_heads, -1))  # (U, nope+v, r)
        w_uk, w_uv = weight.split([self.nope_dim, self.v_dim], dim=1)
        q_nope = q_nope.unflatten(2, (self.up_heads, group))  # (B, T, U, g, nope)
        q_latent = torch.einsum("btugn,unr->btugr", q_nope, w_uk)
        scores = torch.einsum("btugr,bsr->bugts", q_latent, latent).flatten(1, 2)  # (B, H, T, S)
        q_pe = q_pe.unflatten(2, (self.rope_heads, heads // self.rope_heads))  # (B, T, R, j, rope)
        scores = scores + torch.einsum("btrjd,bsrd->brjts", q_pe, k_pe.to(q_pe.dtype)).flatten(1, 2)
        bias = self.kv_b_proj.bias
        if bias is not None:  # q . b_k is constant over keys but still shifts nothing after softmax
            b_k, b_v = bias.unflatten(0, (self.up_heads, -1)).split([self.nope_dim, self.v_dim], dim=1)
            scores = scores + torch.einsum("btugn,un->bugt", q_nope, b_k).flatten(1, 2)[..., None]
        scores = scores.float() * self.scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(-1).to(latent.dtype)  # (B, H, T, S)
        out_latent = torch.einsum("bhts,bsr->bthr", probs, latent).unflatten(2, (self.up_heads, group))
        out = torch.einsum("btugr,uvr->btugv", out_latent, w_uv)  # (B, T, U, g, v)
        if bias is not None:  # attention weights sum to one, so the value bias passes through unchanged
            out = out + b_v[:, None, :]
        return out.flatten(2, 3)


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def flex_attention_kernel(device: torch.device):
    """FlexAttention for `device`: compiled once per process on CUDA (its fused kernel); eager elsewhere, where it
    computes the full score matrix (the CPU reference)."""
    return _compiled_flex_attention() if device.type == "cuda" else flex_attention


def attention_mask(
    docs: Documents, length: int, total: int, query_start: torch.Tensor | None = None
) -> torch.Tensor | None:
    """(B, 1, T, S) bool: causal and within the query's document; None when plain causal suffices.

    `query_start` (0-d device tensor) is the first query's absolute index for a preallocated cache: read on the
    device rather than from `docs.past_len`, so a captured graph stays right on replay, and causality then also
    masks the buffer's slots not written yet.
    """
    if docs.past_len == 0 and docs.single_document and query_start is None:
        return None
    device = docs.doc_start.device
    first = docs.past_len if query_start is None else query_start
    query = torch.arange(length, device=device) + first  # absolute query index
    key = torch.arange(total, device=device)
    causal = key[None, :] <= query[:, None]  # (T, S)
    same_doc = key[None, None, :] >= docs.doc_start[:, :, None]  # (B, T, S)
    return (causal[None] & same_doc)[:, None]


# ------------------------------------------------------------------------------ initialization from attention


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
    raise ValueError(f"student.mla.rope_pairs={rule!r} is invalid: one of {', '.join(map(repr, ROPE_PAIRS))}")


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


# ---------------------------------------------------------------------------------- settings from a teacher


def lossless_mla(spec: TeacherSpec) -> dict:
    """MLA that is the teacher's GQA in MLA form: RoPE over every key dim per KV head, full value rank."""
    return dict(
        kv_lora_rank=spec.num_kv_heads * spec.head_dim,
        q_lora_rank=None,
        qk_nope_head_dim=0,
        qk_rope_head_dim=spec.head_dim,
        v_head_dim=spec.head_dim,
        rope_heads="per_kv_head",
        kv_up_layout="gqa",
        latent_norm=False,
        rope_freq_indices=list(range(spec.head_dim // 2)),
        lossless=True,
    )


def max_kv_rank(spec: TeacherSpec, mla: MLAConfig) -> int:
    """The rank of [W_k (nope rows); W_v] can be at most min(hidden, rows)."""
    rows = spec.num_kv_heads * (mla.qk_nope_head_dim + spec.head_dim)
    return min(spec.hidden_size, rows)


def check_mla_fits(spec: TeacherSpec, mla: MLAConfig, check_rank: bool = True) -> None:
    mla.validate(spec.num_heads, spec.num_kv_heads, spec.head_dim)
    hd = spec.head_dim
    if mla.qk_nope_head_dim + mla.qk_rope_head_dim != hd:
        raise ValueError(
            f"student.mla.qk_nope_head_dim + qk_rope_head_dim = {mla.qk_nope_head_dim} + {mla.qk_rope_head_dim} "
            f"must equal the teacher head_dim {hd}: SVD init splits each teacher key head into nope and RoPE parts"
        )
    if mla.v_head_dim != hd:
        raise ValueError(f"student.mla.v_head_dim={mla.v_head_dim} must equal the teacher head_dim {hd}")
    limit = max_kv_rank(spec, mla)
    ranks = [r for r in (mla.kv_lora_ranks or []) if r] or [mla.kv_lora_rank]
    if check_rank and max(ranks) > limit:
        raise ValueError(
            f"student.mla.kv_lora_rank={max(ranks)} exceeds the rank of the teacher's joint K/V map: allowed 1..{limit}"
        )
    q_limit = min(spec.hidden_size, spec.num_heads * hd)
    if mla.q_lora_rank is not None and mla.q_lora_rank > q_limit:
        raise ValueError(
            f"student.mla.q_lora_rank={mla.q_lora_rank} exceeds the teacher's W_q rank: allowed 1..{q_limit}"
        )


def student_settings(spec: TeacherSpec, mla: dict, options: InitOptions) -> MLAConfig:
    """`student.mla` completed from the teacher: its biases and q/k norms; the lossless dims when asked."""
    mla = dict(mla)
    mla.pop("lossless", None)
    if options.lossless:
        mla = {**mla, **lossless_mla(spec)}
    mla.setdefault("qkv_bias", spec.qkv_bias)
    mla.setdefault("o_bias", spec.o_bias)
    mla.setdefault("qk_norm", spec.qk_norm)
    return config_from_dict(MLAConfig, mla)


def check_fits(spec: TeacherSpec, mla: MLAConfig, options: InitOptions) -> None:
    # With an energy threshold the latent ranks are chosen per layer later (plan_init), from the teacher's spectrum.
    check_mla_fits(spec, mla, check_rank=options.energy is None)


def plan_init(
    config: HybridConfig, spec: TeacherSpec, weights: dict[int, AttentionWeights], options: InitOptions
) -> dict[int, KVFactors]:
    """The RoPE pairs (from all MLA layers' weights) and, with `energy`, per-layer ranks: written into the config's
    MLA settings. Returns each layer's K/V factors, computed once here. Lossless settings are final already."""
    if options.lossless:
        return {}
    mla_cfg = config.mixer_settings(NAME)
    chosen = choose_rope_pairs(list(weights.values()), spec.head_dim, mla_cfg.qk_rope_head_dim, options.rope_pairs)
    mla_cfg.rope_freq_indices = chosen
    _, nope_dims = rope_split(spec.head_dim, chosen)
    factors = {i: kv_factors(w, nope_dims) for i, w in weights.items()}
    if options.energy is not None:
        ranks = [0] * spec.num_layers
        for i in weights:
            ranks[i] = energy_rank(factors[i].s, options.energy)
        mla_cfg.kv_lora_ranks = ranks
    check_mla_fits(spec, mla_cfg)
    config.set_mixer_settings(NAME, mla_cfg)
    return factors


# --------------------------------------------------------------------------------------------- registry entry


def _call(module: MLA, hidden, cos, sin, docs: Documents, cache: MLALayerCache | None) -> torch.Tensor:
    return module(hidden, cos, sin, docs, cache)


def _validate(mla: MLAConfig, config: HybridConfig) -> None:
    mla.validate(config.num_attention_heads, config.num_key_value_heads, config.head_dim)


def _make_cache(config: HybridConfig, layer_idx: int, request: CacheRequest) -> MLALayerCache:
    """Growing (empty until the first call) or, with `max_length`, preallocated buffers written in place."""
    if request.max_length is None:
        return MLALayerCache()
    c, shape = config.mixer_settings(NAME), (request.batch_size, request.max_length)
    rope_heads = c.num_rope_heads(config.num_key_value_heads)
    return MLALayerCache(
        latent=torch.zeros(*shape, c.rank(layer_idx), dtype=request.dtype, device=request.device),
        rope_key=torch.zeros(*shape, rope_heads, c.qk_rope_head_dim, dtype=request.dtype, device=request.device),
        position=request.position,
    )


def _cache_bytes(config: HybridConfig, layer_idx: int, dtype: torch.dtype, state_dtype: torch.dtype) -> CacheBytes:
    """Per token: the latent plus the rotated RoPE key of every RoPE head."""
    mla = config.mixer_settings(NAME)
    rope = mla.num_rope_heads(config.num_key_value_heads) * mla.qk_rope_head_dim
    return CacheBytes(per_token=(mla.rank(layer_idx) + rope) * dtype.itemsize, constant=0)


def _extra_flops(module: MLA, context: float) -> int:
    """Scores and values: 2 * heads * (qk_dim + v_dim) * context."""
    qk = module.nope_dim + module.rope_dim
    return int(2 * module.num_heads * (qk + module.v_dim) * context)


def _init_from_attention(
    module: MLA, w: AttentionWeights, config: HybridConfig, factors: KVFactors | None, options: InitOptions
) -> dict[str, Any]:
    return init_mla_from_attention(module, w, config.mixer_settings(NAME), factors)


MLA_KIND = MixerKind(
    name=NAME,
    module=MLA,
    attribute="self_attn",  # the teacher's name: checkpoints and state-dict keys depend on it
    settings=MLAConfig,
    validate=_validate,
    call=_call,
    make_cache=_make_cache,
    cache_bytes=_cache_bytes,
    extra_flops=_extra_flops,
    init_weights=None,  # nn.Linear and RMSNorm init cover it
    student_settings=student_settings,
    check_fits=check_fits,
    plan_init=plan_init,
    init_from_attention=_init_from_attention,
    reproduces_attention=True,
    calibration=None,  # reproduces the attention: nothing left to fit
    constant_state=False,
)
