"""AdamW with linear warmup and cosine decay to `min_lr_ratio * lr` (per optimizer step)."""

from __future__ import annotations

import math

import torch

from models.errors import first_line


def adamw_cosine(
    params: list[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    max_steps: int,
    min_lr_ratio: float = 0.1,
    cpu_offload: bool = False,
) -> dict:
    """Lightning's `configure_optimizers` dict. Multi-tensor AdamW on CUDA; DeepSpeed's CPU Adam (AdamW mode) when
    the optimizer state lives in CPU memory (`cpu_offload`, ZeRO-Offload)."""
    decay = [p for p in params if p.ndim >= 2]  # no decay on norms, biases, A_log, D, dt_bias
    no_decay = [p for p in params if p.ndim < 2]
    # foreach (multi-tensor) rather than fused: Lightning refuses gradient clipping with a fused optimizer under
    # mixed precision (it would unscale inside the step), and trainer.gradient_clip_val is on for GPU presets.
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    cuda = bool(params) and params[0].is_cuda
    if cpu_offload:
        optimizer = cpu_adamw(groups, lr=lr, betas=(0.9, 0.95))
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), foreach=cuda or None)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = min(1.0, (step - warmup_steps) / max(max_steps - warmup_steps, 1))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def cpu_adamw(groups: list[dict], lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """DeepSpeed's vectorized CPU AdamW, which ZeRO-Offload requires (it refuses torch's optimizers there, being
    several times slower). Its C++ op is built on first use (about a minute; cached in ~/.cache/torch_extensions)."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, adamw_mode=True)
    except Exception as error:  # the op build: a C++ compiler (g++) and ninja are needed
        raise RuntimeError(
            "strategy.offload_optimizer=true needs DeepSpeed's CPU Adam op, built on first use with a C++ compiler "
            f"(g++) and ninja; building it failed: {first_line(error)}"
        ) from error
