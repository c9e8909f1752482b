"""The numerics of distillation: the chunked KD loss (with its fused Triton kernel and its reference) and the
layer-wise ILD loss. Pure functions of tensors and a loss config; nothing here knows about stages or Lightning."""

from .ild import ILD_KINDS, ILDLayerLoss, ILDLossConfig, ild_layer_loss, ild_loss
from .kd import DIVERGENCES, IGNORE_INDEX, KDLossConfig, KDLossOutput, kd_loss
from .kd_reference import divergence_from_logits, kd_loss_ref

__all__ = [
    "DIVERGENCES",
    "IGNORE_INDEX",
    "ILD_KINDS",
    "ILDLayerLoss",
    "ILDLossConfig",
    "KDLossConfig",
    "KDLossOutput",
    "divergence_from_logits",
    "ild_layer_loss",
    "ild_loss",
    "kd_loss",
    "kd_loss_ref",
]
