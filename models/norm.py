"""RMSNorm (Llama convention) and the gated, grouped RMSNorm of Mamba2."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .compile import compiled_in_training
from .kernels import triton_rmsnorm_fn


@compiled_in_training
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight in fp32, cast back (as HF Llama does, so the teacher's norms copy exactly)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def gated_rms_norm_ref(
    x: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    group_size: int,
    norm_before_gate: bool,
) -> torch.Tensor:
    """Pure-torch twin of mamba-ssm's `rmsnorm_fn`: RMS over groups of `group_size` channels, gate silu(z)."""
    dtype = x.dtype
    x = x.float()
    if z is not None and not norm_before_gate:
        x = x * F.silu(z.float())
    groups = x.unflatten(-1, (-1, group_size))  # (..., G, group_size)
    x = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)
    x = x * weight.float()
    if z is not None and norm_before_gate:
        x = x * F.silu(z.float())
    return x.to(dtype)


class GatedRMSNorm(nn.Module):
    """Mamba2's output norm: y = rmsnorm(x * silu(z)) (norm_before_gate=False), grouped."""

    def __init__(self, dim: int, eps: float = 1e-5, groups: int = 1, norm_before_gate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.group_size = dim // groups
        self.norm_before_gate = norm_before_gate
        self.use_triton = True

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_triton and x.is_cuda and triton_rmsnorm_fn() is not None:
            return triton_rmsnorm_fn()(
                x,
                self.weight,
                None,
                z=z,
                eps=self.eps,
                group_size=self.group_size,
                norm_before_gate=self.norm_before_gate,
            )
        return gated_rms_norm_ref(x, z, self.weight, self.eps, self.group_size, self.norm_before_gate)
