"""Analytic cache accounting: bytes per token (grows with context) and constant state bytes per sequence.

MLA layers cache the latent plus the RoPE key per token; Mamba2 layers hold a fixed conv + SSM state.
The teacher (GQA) caches K and V for every KV head in every layer. These numbers must equal what
`HybridCache` actually allocates (tests check it), so reports and benchmarks can quote them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import HybridConfig


@dataclass(frozen=True)
class CacheBytes:
    per_token: int  # bytes added per token per sequence
    constant: int  # bytes per sequence, independent of length

    def total(self, tokens: int, batch: int = 1) -> int:
        return batch * (self.per_token * tokens + self.constant)


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def student_cache_bytes(
    config: HybridConfig, dtype: torch.dtype = torch.bfloat16, ssm_state_dtype: torch.dtype = torch.float32
) -> CacheBytes:
    per_token = constant = 0
    if "mla" in config.mixer_types:
        mla = config.mla_config
        rope = mla.num_rope_heads(config.num_key_value_heads) * mla.qk_rope_head_dim
        per_token = sum(mla.rank(i) + rope for i in config.mla_layers) * _size(dtype)
    n_mamba = config.mixer_types.count("mamba")
    if n_mamba:
        dims, d_conv = config.mamba_dims, config.mamba_config.d_conv
        conv = dims.conv_dim * (d_conv - 1) * _size(dtype)
        ssm = dims.nheads * dims.headdim * dims.d_state * _size(ssm_state_dtype)
        constant = n_mamba * (conv + ssm)
    return CacheBytes(per_token=per_token, constant=constant)


def teacher_cache_bytes(
    num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.bfloat16
) -> CacheBytes:
    """A GQA transformer's KV cache: K and V per KV head per layer per token."""
    return CacheBytes(per_token=num_layers * 2 * num_kv_heads * head_dim * _size(dtype), constant=0)
