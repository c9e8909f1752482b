"""Analytic cache accounting: bytes per token (grows with context) and constant state bytes per sequence.

MLA layers cache the latent plus the RoPE key per token; Mamba2 layers hold a fixed conv + SSM state (each
kind's `cache_bytes` and `extra_flops` live in its mixer file; this file sums them over layers).
The teacher (GQA) caches K and V for every KV head in every layer. These numbers must equal what
`HybridCache` actually allocates (tests check it), so reports and benchmarks can quote them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from .mixer_kind import CacheBytes
from .mixers import kind_of_module, mixer_kind

if TYPE_CHECKING:
    from .config import HybridConfig


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def student_cache_bytes(
    config: HybridConfig, dtype: torch.dtype = torch.bfloat16, ssm_state_dtype: torch.dtype = torch.float32
) -> CacheBytes:
    """Sum over layers of what each layer's mixer kind caches (per token and constant)."""
    per_token = constant = 0
    for i, name in enumerate(config.mixer_types):
        layer = mixer_kind(name).cache_bytes(config, i, dtype, ssm_state_dtype)
        per_token, constant = per_token + layer.per_token, constant + layer.constant
    return CacheBytes(per_token=per_token, constant=constant)


def layer_cache_bytes(
    configs: Mapping[str, HybridConfig],
    dtype: torch.dtype = torch.bfloat16,
    ssm_state_dtype: torch.dtype = torch.float32,
) -> list[dict[str, CacheBytes]]:
    """Per layer {kind: what that kind would cache there}, each kind read from its own config (an all-<kind>
    candidate's: per-layer settings such as MLA ranks chosen by energy are in it); dtypes as student_cache_bytes'."""
    num_layers = next(iter(configs.values())).num_hidden_layers
    return [
        {name: mixer_kind(name).cache_bytes(config, i, dtype, ssm_state_dtype) for name, config in configs.items()}
        for i in range(num_layers)
    ]


def teacher_cache_bytes(
    num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.bfloat16
) -> CacheBytes:
    """A GQA transformer's KV cache: K and V per KV head per layer per token."""
    return CacheBytes(per_token=num_layers * 2 * num_kv_heads * head_dim * _size(dtype), constant=0)


# ------------------------------------------------------------------------------------------- training FLOPs
#
# Model FLOPs per token, counted analytically (a multiply-add is 2 FLOPs), for MFU:
#   - every nn.Linear: 2 * in * out (the lm_head included where it runs; embeddings are lookups, 0);
#   - attention (teacher GQA, student MLA): 2 * heads * (qk_dim + v_dim) * context, context = the mean number of keys
#     a token attends to (causal, within its document: mean(position_id) + 1 for a packed batch);
#   - Mamba2's chunked SSD scan per head: Q * (N + P) for the causal intra-chunk blocks (C B^T, then times x, each
#     half of a Q x Q block) plus 4 * N * P for the chunk states (B^T x, then C h), Q the chunk size; the depthwise
#     conv 2 * conv_dim * d_conv;
#   - backward = 2 x forward for what is trained (input and weight gradients); 1 x forward for frozen modules that
#     gradients pass through (input gradients only); 0 for modules nothing flows back through (the teacher).
# Norms, activations, RoPE and softmax are left out (memory-bound, a few % of the total), as in the usual
# 6N + attention convention, so MFU here is comparable with torchtitan's and nanoGPT's.


def linear_flops(module: torch.nn.Module) -> int:
    """Forward FLOPs per token of every nn.Linear inside `module`."""
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def attention_context(position_ids: torch.Tensor) -> float:
    """Mean number of keys per query for causal attention within documents (position ids restart at 0)."""
    return float(position_ids.float().mean()) + 1.0


def mixer_extra_flops(mixer: torch.nn.Module, context: float) -> int:
    """Forward FLOPs per token of a mixer beyond its Linear layers: attention scores and values, or SSD + conv.
    Works for the student's MLA / Mamba2 and for Hugging Face attention modules (Llama, Qwen, Mistral)."""
    kind = kind_of_module(mixer)
    if kind is not None:
        return kind.extra_flops(mixer, context)
    config = mixer.config  # a transformers attention module
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(2 * heads * 2 * head_dim * context)


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.model.layers)


def _mixer(layer: torch.nn.Module) -> torch.nn.Module:
    return layer.mixer if hasattr(layer, "mixer") else layer.self_attn


def forward_flops(model: torch.nn.Module, context: float, lm_head: bool = True) -> int:
    """Forward FLOPs per token of a causal LM (student or Hugging Face teacher)."""
    total = sum(linear_flops(layer) + mixer_extra_flops(_mixer(layer), context) for layer in _layers(model))
    return total + (linear_flops(model.lm_head) if lm_head else 0)


def kd_step_flops(teacher: torch.nn.Module, student: torch.nn.Module, context: float) -> int:
    """Model FLOPs per token of one end-to-end distillation step: student forward + backward (all trained) +
    teacher forward, both with their lm_head."""
    return 3 * forward_flops(student, context) + forward_flops(teacher, context)


def ild_step_flops(teacher: torch.nn.Module, students: list, context: float, mlp_trained: bool = False) -> int:
    """Model FLOPs per token of one layer-wise alignment step: teacher trunk forward + for every student layer,
    mixer forward + backward (trained) and the MLP's forward + input gradient (the layer-output loss flows back
    through it), + its weight gradient when `mlp_trained`. No lm_heads."""
    total = forward_flops(teacher, context, lm_head=False)
    for student in students:
        for layer in _layers(student):
            mixer = _mixer(layer)
            mixer_fwd = linear_flops(mixer) + mixer_extra_flops(mixer, context)
            rest = linear_flops(layer) - linear_flops(mixer)  # the MLP
            total += 3 * mixer_fwd + (3 if mlp_trained else 2) * rest
    return total


def teacher_step_flops(teacher: torch.nn.Module, context: float) -> int:
    """Model FLOPs per token of a plain training step of the teacher (forward + backward with its lm_head): the
    baseline the distillation steps are compared with."""
    return 3 * forward_flops(teacher, context)
