"""AttentionWeights: a teacher attention layer's weights, per head, in float64 for the linear algebra of
initialization. What every mixer's init-from-attention reads; the teacher's adapter (models/teachers/) fills it.
Its own flat file, importing nothing of ours: the exported student carries the models/*.py its mixers import."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionWeights:
    q: torch.Tensor  # (H, hd, D)
    k: torch.Tensor  # (Hkv, hd, D)
    v: torch.Tensor  # (Hkv, hd, D)
    o: torch.Tensor  # (D, H * hd)
    q_bias: torch.Tensor | None  # (H, hd)
    k_bias: torch.Tensor | None  # (Hkv, hd)
    v_bias: torch.Tensor | None  # (Hkv, hd)
    o_bias: torch.Tensor | None  # (D,)
    q_norm: torch.Tensor | None  # (hd,) Qwen3's per-head RMSNorm weights
    k_norm: torch.Tensor | None
