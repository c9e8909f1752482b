"""One frozen teacher forward that records what layer-wise distillation aligns to, per layer:
the layer's input, its attention output and its output (forward hooks; nothing is recomputed).

Where to hook comes from the teacher's adapter (its decoder layers and each layer's attention module);
`TeacherAdapter.capture` is the entry point."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .adapter import TeacherAdapter


@dataclass
class TeacherTrace:
    inputs: list[torch.Tensor]  # per layer (B, T, D); None for layers not captured
    attn_outputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    final_hidden: torch.Tensor  # after the final norm (B, T, D)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def capture_trace(
    adapter: TeacherAdapter,
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    layers: list[int] | None = None,
) -> TeacherTrace:
    decoder_layers = adapter.layers(model)
    n = len(decoder_layers)
    inputs, attn, outputs = [None] * n, [None] * n, [None] * n
    handles = []
    for i, layer in enumerate(decoder_layers):
        if layers is not None and i not in layers:
            continue

        def pre(module, args, kwargs, i=i):
            inputs[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        def post(module, args, output, i=i):
            outputs[i] = _first(output)

        def attn_post(module, args, output, i=i):
            attn[i] = _first(output)

        handles += [
            layer.register_forward_pre_hook(pre, with_kwargs=True),
            layer.register_forward_hook(post),
            adapter.attention(layer).register_forward_hook(attn_post),
        ]
    try:
        final_hidden = adapter.final_hidden(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return TeacherTrace(inputs, attn, outputs, final_hidden)
