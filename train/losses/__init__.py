"""The numerics of distillation: the chunked KD loss (with its fused Triton kernel and its reference) and the
layer-wise ILD loss. Pure functions of tensors and a loss config; nothing here knows about stages or Lightning."""

from .ild import ILD_KINDS, ILDLayerLoss, ILDLossConfig, ild_layer_loss, ild_loss
from .kd import DIVERGENCES, IGNORE_INDEX, KDLossConfig, KDLossOutput, kd_loss
from .kd_reference import divergence_from_logits, kd_loss_ref
from .kd_topk import TOPK_DIVERGENCES, check_topk_config, kd_topk_loss, teacher_topk

__all__ = [
    "DIVERGENCES",
    "IGNORE_INDEX",
    "ILD_KINDS",
    "ILDLayerLoss",
    "ILDLossConfig",
    "KDLossConfig",
    "KDLossOutput",
    "TOPK_DIVERGENCES",
    "check_topk_config",
    "divergence_from_logits",
    "ild_layer_loss",
    "ild_loss",
    "kd_loss",
    "kd_loss_ref",
    "kd_topk_loss",
    "teacher_topk",
]
