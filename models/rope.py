"""Rotary position embedding: the teacher's frequency table and its application.

The student computes the teacher's full table of head_dim/2 inverse frequencies (for every RoPE variant
the supported teachers use) and each MLA layer rotates its decoupled RoPE key/query with a subset of
those frequencies. Keeping the teacher's frequencies (rather than a fresh RoPE of a smaller dim) is what
lets SVD initialization keep the teacher's positional behaviour. Rotation pairs follow the Hugging Face
`rotate_half` convention: dim j pairs with dim j + d/2.

No state is kept in buffers: the table is a few hundred numbers, recomputed per forward in fp32, so
loading on the meta device or moving between devices can never leave a stale table behind.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_inv_freq(
    rope_parameters: dict, head_dim: int, max_position_embeddings: int, device: torch.device | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) in fp32 and the cos/sin scaling factor of the teacher's RoPE."""
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    base = float(rope_parameters.get("rope_theta", 10000.0))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    inv_freq = 1.0 / base**exponents
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(rope_parameters["factor"]), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope_parameters), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(inv_freq, rope_parameters, head_dim, base, max_position_embeddings)
    raise ValueError(
        f"rope_parameters.rope_type={rope_type!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}"
    )


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short kept, a smooth blend in between."""
    factor = float(p["factor"])
    low_freq_factor = float(p["low_freq_factor"])
    high_freq_factor = float(p["high_freq_factor"])
    old_context = float(p["original_max_position_embeddings"])
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def _yarn_inv_freq(
    inv_freq: torch.Tensor, p: dict, head_dim: int, base: float, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """YaRN (Qwen long context): interpolate low frequencies, extrapolate high ones, scale cos/sin."""
    old_context = p.get("original_max_position_embeddings") or max_position_embeddings
    factor = p.get("factor") or max_position_embeddings / old_context
    factor = float(factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(old_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=inv_freq.device) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    blended = (inv_freq / factor) * ramp + inv_freq * extrapolation_weight
    return blended, float(attention_factor)


def rope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, n_freq) in fp32 for integer positions (B, T)."""
    angles = position_ids.to(torch.float32)[..., None] * inv_freq  # (B, T, n_freq)
    return angles.cos() * scaling, angles.sin() * scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, heads, d) with cos/sin (B, T, d/2): pairs (j, j + d/2), computed in fp32."""
    half = x.shape[-1] // 2
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
