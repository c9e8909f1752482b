"""Multi-head latent attention (MLA), one module for training, prefill and absorbed decoding.

Per token, keys and values come from one low-rank latent c = W_dkv h (kv_lora_rank values) plus a small
decoupled RoPE key k_pe (rope heads x qk_rope_head_dim). Scores are q_nope . k_nope + q_pe . k_pe with
k_nope, v = W_ukv c, up-projected either per teacher KV head and shared by its query group ("gqa", the
shape SVD of a GQA teacher produces) or per head. Only c and the rotated k_pe are cached.

Training and prefill decompress the call's own latents and run SDPA. With cached tokens (decoding) the
up-projections are absorbed instead: queries move into latent space (q_nope W_uk), attend over the cached
latents directly, and the latent-space output is mapped by W_uv; the cache is never decompressed.
Parameter names follow DeepSeek-V2 (q_proj / q_a_proj / q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import MLALayerCache
from .config import HybridConfig
from .documents import Documents
from .norm import RMSNorm
from .rope import apply_rope


class MLA(nn.Module):
    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        c = config.mla_config
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
