"""Layer-wise distillation (ILD) losses.

Student vs teacher hidden states (B, T, H) over the real tokens of `mask` (B, T), in fp32:
- "mse": mean of squared differences over valid tokens and hidden dims = sum (s - t)^2 / (N * H)
- "l2":  mean over valid tokens of the per-token L2 norm = sum_tokens ||s - t||_2 / N
The teacher side is a target (detached). Padded positions contribute nothing, whatever they hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kd import _check_weight, _fail, _softmax_dtype

ILD_KINDS = ("mse", "l2")


@dataclass
class ILDLossConfig:
    """Layer-wise alignment: output_weight * ild(layer out) + mixer_weight * ild(mixer out vs teacher attention)."""

    loss: str = "mse"  # "mse": mean squared error per element | "l2": L2 norm per token (Zebra-Llama's)
    output_weight: float = 1.0  # weight of the layer-output term
    mixer_weight: float = 1.0  # weight of the mixer (attention) output term

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, key: str = "ild") -> None:
        if self.loss not in ILD_KINDS:
            _fail(f"{key}.loss", self.loss, " | ".join(ILD_KINDS))
        _check_weight(f"{key}.mixer_weight", self.mixer_weight)
        _check_weight(f"{key}.output_weight", self.output_weight)


@dataclass
class ILDLayerLoss:
    loss: torch.Tensor  # output_weight * output + mixer_weight * mixer, differentiable
    output: torch.Tensor  # detached parts, for logging
    mixer: torch.Tensor


def ild_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Student vs teacher hidden states (B, T, H) over the real tokens of `mask` (B, T); scalar, fp32.

    "mse": sum (s - t)^2 / (N * H); "l2": sum_tokens ||s - t||_2 / N, with N the number of real tokens.
    Padded positions are excluded whatever they hold (NaN included); no real tokens give a zero loss still
    connected to `student`. The teacher is detached. No host sync."""
    if kind not in ILD_KINDS:
        _fail("ild.loss", kind, " | ".join(ILD_KINDS))
    if student.shape != teacher.shape or mask.shape != student.shape[:-1]:
        raise ValueError(
            f"ild_loss: student {tuple(student.shape)}, teacher {tuple(teacher.shape)} and mask "
            f"{tuple(mask.shape)} must be (B, T, H), (B, T, H) and (B, T)"
        )
    dtype = _softmax_dtype(student.dtype)
    real = mask.bool()
    diff = torch.where(real[..., None], student.to(dtype) - teacher.detach().to(dtype), 0.0)  # (B, T, H)
    n = real.sum().clamp_min(1).to(dtype)
    if kind == "mse":
        return diff.square().sum() / (n * student.shape[-1])
    return torch.linalg.vector_norm(diff, dim=-1).sum() / n  # zero rows have a zero (not NaN) gradient


def ild_layer_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    student_mixer: torch.Tensor,
    teacher_mixer: torch.Tensor,
    mask: torch.Tensor,
    cfg: ILDLossConfig,
) -> ILDLayerLoss:
    """One layer: output_weight * ild(layer output) + mixer_weight * ild(student mixer vs teacher attention).
    A term with weight 0 is still reported but kept out of the graph."""

    def term(s, t, weight):
        if weight == 0:
            with torch.no_grad():
                return ild_loss(s, t, mask, cfg.loss)
        return ild_loss(s, t, mask, cfg.loss)

    output = term(student_out, teacher_out, cfg.output_weight)
    mixer = term(student_mixer, teacher_mixer, cfg.mixer_weight)
    loss = cfg.output_weight * output + cfg.mixer_weight * mixer
    return ILDLayerLoss(loss=loss, output=output.detach(), mixer=mixer.detach())
