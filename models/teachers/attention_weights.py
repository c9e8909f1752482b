"""Reads a teacher attention module of the Hugging Face Llama layout (q/k/v/o_proj, optional biases, Qwen3's
q_norm/k_norm) into AttentionWeights; call it through `TeacherAdapter.attention_weights`, which knows where a family
keeps its attention modules."""

from __future__ import annotations

import torch
from torch import nn

from ..attention_weights import AttentionWeights


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float64)


def attention_weights(self_attn: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int) -> AttentionWeights:
    """Read q/k/v/o projections (and biases, q/k norms) from an HF Llama/Qwen/Mistral attention module."""

    def heads(linear: nn.Linear, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = _f64(linear.weight).unflatten(0, (n, head_dim))
        bias = _f64(linear.bias)
        return weight, None if bias is None else bias.unflatten(0, (n, head_dim))

    q, q_bias = heads(self_attn.q_proj, num_heads)
    k, k_bias = heads(self_attn.k_proj, num_kv_heads)
    v, v_bias = heads(self_attn.v_proj, num_kv_heads)
    q_norm = getattr(self_attn, "q_norm", None)
    k_norm = getattr(self_attn, "k_norm", None)
    return AttentionWeights(
        q=q,
        k=k,
        v=v,
        o=_f64(self_attn.o_proj.weight),
        q_bias=q_bias,
        k_bias=k_bias,
        v_bias=v_bias,
        o_bias=_f64(self_attn.o_proj.bias),
        q_norm=None if q_norm is None else _f64(q_norm.weight),
        k_norm=None if k_norm is None else _f64(k_norm.weight),
    )
