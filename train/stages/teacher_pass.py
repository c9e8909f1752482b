"""One frozen teacher forward that records what layer-wise distillation aligns to, per layer:
the layer's input, its attention output and its output (forward hooks; nothing is recomputed)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from data.batch import teacher_inputs


@dataclass
class TeacherTrace:
    inputs: list[torch.Tensor]  # per layer (B, T, D)
    attn_outputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    final_hidden: torch.Tensor  # after the final norm (B, T, D)


@torch.no_grad()
def trace_teacher(
    teacher: PreTrainedModel, batch: dict[str, torch.Tensor], layers: list[int] | None = None
) -> TeacherTrace:
    n = len(teacher.model.layers)
    inputs, attn, outputs = [None] * n, [None] * n, [None] * n
    handles = []
    for i, layer in enumerate(teacher.model.layers):
        if layers is not None and i not in layers:
            continue

        def pre(module, args, kwargs, i=i):
            inputs[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        def post(module, args, output, i=i):
            outputs[i] = output[0] if isinstance(output, tuple) else output

        def attn_post(module, args, output, i=i):
            attn[i] = output[0] if isinstance(output, tuple) else output

        handles += [
            layer.register_forward_pre_hook(pre, with_kwargs=True),
            layer.register_forward_hook(post),
            layer.self_attn.register_forward_hook(attn_post),
        ]
    try:
        out = teacher.model(**teacher_inputs(batch, teacher))
    finally:
        for handle in handles:
            handle.remove()
    return TeacherTrace(inputs, attn, outputs, out.last_hidden_state)
