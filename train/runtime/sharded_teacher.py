"""`teacher.shard`: the frozen teacher partitioned over the ranks by DeepSpeed ZeRO-3 instead of replicated.

`shard_teacher` hands the teacher to `deepspeed.initialize` with the model alone and a stage-3 config without an
optimizer (as TRL prepares its frozen reference model): every parameter is cut into one slice per rank, and each
module gathers its own whole parameters in its forward and frees them after. A rank then holds ~1/N of the
teacher's weights between uses, and at most a few modules' worth while the forward runs.

Two things follow for the callers (train/stages/module.py):

- a pass enters through the engine (`TeacherPass`, the root module), not a submodule such as the decoder: ZeRO-3
  resets its per-pass gather schedule (the recorded module order its prefetch follows) in the root's forward hook;
  a submodule's own hooks would still gather correctly, but the schedule would never reset;
- a weight read outside the teacher's forward is an empty placeholder there (KD reads the teacher's lm_head weight
  in its loss): `gathered(...)` makes it whole for the duration of a `with` block, on every rank (a collective).

The weights stay partitioned after the stage: the stage's Context forgets that teacher (train/stages/context.py),
so a later user (evaluation, ILD's held-out losses, on rank 0 alone) loads it whole again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from models.teachers import TeacherTrace, adapter_for

from .deepspeed_strategy import is_zero3


def teacher_outputs(
    teacher: nn.Module, batch: Mapping[str, torch.Tensor], trace: bool = False
) -> torch.Tensor | TeacherTrace:
    """The teacher's pass a stage makes: its final hidden states (B, T, D), or with `trace` ILD's per-layer trace."""
    adapter = adapter_for(teacher)
    return adapter.capture(teacher, batch) if trace else adapter.final_hidden(teacher, batch)


class TeacherPass(nn.Module):
    """`teacher_outputs` as one module: the root the ZeRO-3 engine calls."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher

    def forward(self, batch: Mapping[str, torch.Tensor], trace: bool = False) -> torch.Tensor | TeacherTrace:
        return teacher_outputs(self.teacher, batch, trace)


def teacher_zero3_config(training_config: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """An inference ZeRO-3 config for a frozen model of `dtype`: the training strategy's stage-3 parameter settings
    (persistence threshold, prefetch, parameter offload), no optimizer, and the precision section that keeps the
    teacher's own weights as they are (a bf16 flag would cast an fp32 teacher and change its logits)."""
    zero = training_config.get("zero_optimization", {})
    kept = {k: v for k, v in zero.items() if k.startswith("stage3_") or k == "offload_param"}
    return {
        "train_micro_batch_size_per_gpu": 1,  # DeepSpeed's config requires a batch size; nothing trains here
        "zero_optimization": {"stage": 3, **kept},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
    }


def shard_teacher(teacher: nn.Module, training_config: Mapping[str, Any]) -> nn.Module:
    """Partition `teacher`'s parameters in place over the process group and return the engine to call for a pass
    (`engine(batch)` or `engine(batch, trace=True)`). Every rank must call it, with identical weights."""
    import deepspeed

    dtype = next(teacher.parameters()).dtype
    engine, *_ = deepspeed.initialize(model=TeacherPass(teacher), config=teacher_zero3_config(training_config, dtype))
    engine.eval()  # DeepSpeedEngine.eval returns None, unlike nn.Module.eval
    return engine


def held_bytes(model: nn.Module) -> int:
    """Bytes of `model`'s parameters this rank holds between uses: its slice of each partitioned parameter (padded
    to a multiple of the world size), the whole of any other; a tied parameter counts once."""
    total = 0
    for p in model.parameters():  # deduplicated: a tied lm_head is the embedding's Parameter
        tensor = p.ds_tensor if is_zero3(p) else p  # ds_tensor: this rank's slice
        total += tensor.numel() * tensor.element_size()
    return total


@contextlib.contextmanager
def gathered(*params: torch.Tensor) -> Iterator[None]:
    """The partitioned parameters among `params` whole inside the block (read-only), partitioned again after;
    nothing to do for ordinary tensors. A collective: every rank enters it."""
    partitioned = [p for p in params if is_zero3(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield
