"""Least-squares fit of a recurrent mixer's output-norm weight to the teacher attention's output.

A Mamba2 or Gated DeltaNet layer initialized from attention computes linear-attention features n (normalized and
gated, one per channel), then out = W_o (w * n) with the norm's weight w and the teacher's W_o. Attention's softmax
has no counterpart, so the scale of n per channel is unrelated to the teacher's values; w is the one place that
can absorb it. Over calibration tokens t with teacher attention outputs a_t, min_w sum_t ||W_o diag(n_t) w - a_t||^2
is linear least squares with the normal equations

    [(W_o^T W_o) * (sum_t n_t n_t^T)] w = sum_t n_t * (W_o^T a_t)          (* elementwise)

so only two sums over tokens are kept (d_inner^2 + d_inner numbers), whatever the number of batches. A small ridge
(RIDGE times the mean diagonal) toward the weight as initialized keeps channels the text never excites there.
"""

from __future__ import annotations

import torch
from torch import nn

from .documents import Documents

RIDGE = 1e-3


class OutputNormFit:
    """Calibration (models/mixer_kind.py) of `module`, whose output is `out_proj(norm(features, gate))`, `norm` a
    GatedRMSNorm whose weight multiplies its output per channel (either gate order)."""

    def __init__(self, module: nn.Module, norm: nn.Module, out_proj: nn.Linear, call) -> None:
        """`call`: the kind's uniform forward (`MixerKind.call`), run here without a cache."""
        self.module, self.norm, self.out_proj, self.call = module, norm, out_proj, call
        self.gram: torch.Tensor | None = None  # sum_t n_t n_t^T, float64
        self.rhs: torch.Tensor | None = None  # sum_t n_t * (W_o^T a_t), float64
        self.sq_err_before = 0.0  # sum_t ||out_t - a_t||^2 with the weight as initialized
        self.sq_target = 0.0  # sum_t ||a_t||^2
        self.sq_centered = 0.0  # sum_t ||a_t - b||^2, b the output bias (if any)

    @torch.no_grad()
    def add(self, hidden: torch.Tensor, cos, sin, docs: Documents, target: torch.Tensor, mask: torch.Tensor) -> None:
        captured = {}
        hook = self.out_proj.register_forward_pre_hook(lambda _, args: captured.setdefault("x", args[0]))
        try:
            out = self.call(self.module, hidden, cos, sin, docs, None)
        finally:
            hook.remove()
        weight = self.norm.weight.float()
        if (weight == 0).any():
            raise ValueError(
                f"{type(self.module).__name__} layer {getattr(self.module, 'layer_idx', '?')}: its output "
                "norm weight has zeros, so its features cannot be recovered for the fit"
            )
        real = mask.bool()
        # The sums in fp32, outside the stage's autocast (bf16 sums would shift the fit and its reported error).
        with torch.autocast(hidden.device.type, enabled=False):
            features = captured["x"][real].float() / weight  # n_t, (tokens, d_inner)
            target = target[real].float()
            self.sq_err_before += (out[real].float() - target).pow(2).sum().item()
            self.sq_target += target.pow(2).sum().item()
            if self.out_proj.bias is not None:  # fit what the weight must produce: a_t - b
                target = target - self.out_proj.bias.float()
            self.sq_centered += target.pow(2).sum().item()
            gram = (features.T @ features).double()
            rhs = (features * (target @ self.out_proj.weight.float())).sum(0).double()
        self.gram = gram if self.gram is None else self.gram + gram
        self.rhs = rhs if self.rhs is None else self.rhs + rhs

    def _system(self) -> torch.Tensor:
        """(W_o^T W_o) * sum_t n_t n_t^T, float64."""
        if self.gram is None:
            raise ValueError("no calibration batch was added")
        wo = self.out_proj.weight.double()
        return (wo.T @ wo) * self.gram

    @torch.no_grad()
    def solve(self, system: torch.Tensor | None = None) -> torch.Tensor:
        """The fitted weight (d_inner,), float64."""
        system = self._system() if system is None else system
        ridge = RIDGE * system.diagonal().mean()
        start = self.norm.weight.detach().double()  # the ridge pulls toward it: channels the text never excites keep it
        eye = torch.eye(len(system), dtype=system.dtype, device=system.device)
        return torch.linalg.solve(system + ridge * eye, self.rhs + ridge * start)

    @torch.no_grad()
    def apply(self) -> dict[str, float]:
        """Write the fitted weight; report the relative error of the mixer output on the calibration tokens before
        and after (the after from the normal equations: ||a - b||^2 - 2 w.r + w^T S w, no second pass)."""
        system = self._system()
        w = self.solve(system)
        sq_after = self.sq_centered - 2 * (w @ self.rhs).item() + (w @ system @ w).item()
        self.norm.weight.copy_(w.to(self.norm.weight.dtype))
        return {
            "calib_rel_err_before": (self.sq_err_before / self.sq_target) ** 0.5,
            "calib_rel_err_after": (max(sq_after, 0.0) / self.sq_target) ** 0.5,
        }
