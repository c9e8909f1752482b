"""Depthwise causal conv1d with document boundaries and carried state (pure torch, all devices).

Mamba2 convolves x, B and C over time with a short kernel (d_conv taps). For packed sequences a tap that
reaches into the previous document must read zero, exactly as if the document ran alone; for decoding the
last d_conv-1 inputs are carried between calls. causal-conv1d's CUDA kernel is optional and not used: at
d_conv=4 this costs four fused multiply-adds per element.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, C, T), weight (C, K), seq_idx (B, T), initial_state (B, C, K-1) -> (out (B, C, T), state).

    The returned state holds the last K-1 inputs of the last document (zeros where they belong to an
    earlier one), which is what the next call continues from. No activation is applied.
    """
    batch, channels, length = x.shape
    k = weight.shape[-1]
    if initial_state is None:
        initial_state = x.new_zeros(batch, channels, k - 1)
    padded = torch.cat([initial_state.to(x.dtype), x], dim=-1)  # (B, C, K-1+T)
    if seq_idx is None:
        out = F.conv1d(padded, weight[:, None, :], bias, groups=channels)
        return out, padded[..., length:]
    # Document id of every padded position; carried-state positions belong to the first document.
    ids = torch.cat([seq_idx[:, :1].expand(batch, k - 1), seq_idx], dim=-1)  # (B, K-1+T)
    out = (
        x.new_zeros(batch, channels, length)
        if bias is None
        else bias[None, :, None].expand(batch, channels, length).to(x.dtype)
    )
    for tap in range(k):
        same_doc = (ids[:, tap : tap + length] == seq_idx)[:, None, :]  # (B, 1, T)
        out = out + padded[..., tap : tap + length] * weight[None, :, tap, None] * same_doc
    last = (ids[:, length:] == seq_idx[:, -1:])[:, None, :]  # (B, 1, K-1)
    return out, padded[..., length:] * last


def causal_conv1d_step(
    x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """One decoding step: x (B, C), state (B, C, K-1) updated in place; returns (B, C)."""
    window = torch.cat([state, x[..., None].to(state.dtype)], dim=-1)  # (B, C, K)
    out = (window * weight).sum(-1)
    if bias is not None:
        out = out + bias
    state.copy_(window[..., 1:])
    return out.to(x.dtype)
