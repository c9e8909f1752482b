"""Analytic model FLOPs (models/flops.py) against PyTorch's FlopCounterMode, an independent count of the matmuls a
forward executes. SDPA runs its math backend, which computes the full T x T score square: the analytic count at a
context of T keys per query must equal it exactly (training uses the causal context, (T + 1) / 2 on average)."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from models.flops import (
    attention_context,
    forward_flops,
    ild_step_flops,
    kd_step_flops,
    linear_flops,
    mixer_extra_flops,
    teacher_step_flops,
)

from .tiny import tiny_model


def _counted(model, inputs: dict) -> int:
    """FLOPs of one forward over the batch, attention computed as full squares (SDPA's math backend)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(**inputs)
    return counter.get_total_flops()


def _teacher() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("batch,length", [(2, 16), (1, 40)])
def test_teacher_flops_match_the_counted_forward(batch, length):
    teacher = _teacher()
    ids = torch.randint(0, 97, (batch, length))
    positions = torch.arange(length).expand(batch, -1)
    counted = _counted(teacher, {"input_ids": ids})
    assert forward_flops(teacher, context=length) * batch * length == counted
    assert attention_context(positions) == pytest.approx((length + 1) / 2)
    linear = sum(linear_flops(layer) for layer in teacher.model.layers) + linear_flops(teacher.lm_head)
    extra = sum(mixer_extra_flops(layer.self_attn, 7.0) for layer in teacher.model.layers)
    assert forward_flops(teacher, 7.0) == linear + extra


def test_student_mla_flops_match_the_counted_forward():
    student = tiny_model(mixers=("mla", "mla"))
    batch, length = 2, 24
    ids = torch.randint(0, 97, (batch, length))
    positions = torch.arange(length).expand(batch, -1)
    counted = _counted(student, {"input_ids": ids, "position_ids": positions})
    assert forward_flops(student, context=length) * batch * length == counted


def test_training_flops_compose_forward_and_backward():
    teacher, student = _teacher(), tiny_model(mixers=("mla", "mamba", "mla"))
    context = 10.0
    kd = kd_step_flops(teacher, student, context)
    assert kd == 3 * forward_flops(student, context) + forward_flops(teacher, context)
    assert teacher_step_flops(teacher, context) == 3 * forward_flops(teacher, context)
    ild = ild_step_flops(teacher, [student], context)
    ild_layers = ild_step_flops(teacher, [student], context, mlp_trained=True)
    mlp = sum(linear_flops(layer.mlp) for layer in student.model.layers)
    assert ild_layers - ild == mlp  # a trained MLP adds its weight gradient: one more forward's worth
    assert ild < kd  # no lm_heads, no student trunk beyond the layers
    mamba = student.model.layers[1].mixer
    d = mamba.dims
    assert (
        mixer_extra_flops(mamba, context)
        == d.nheads * (mamba.chunk_size * (d.d_state + d.headdim) + 4 * d.d_state * d.headdim) + 2 * d.conv_dim * 4
    )
