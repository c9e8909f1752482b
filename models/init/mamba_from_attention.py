"""Mamba2 from the same layer's attention (the MambaInLlama / Zebra-Llama mapping), GQA layout.

Linear attention without softmax is Mamba2 with no decay: y_t = sum_s (C_t . B_s) x_s. So the teacher's
projections map one to one: x <- W_v and B <- W_k per KV head (repeated over the query group), C <- W_q per
head, out_proj <- W_o (biases too). The causal conv starts as an identity tap (the newest input passes
through unchanged) so that, at init, the features are the teacher's q/k/v through the conv's SiLU.

Defaults for what attention has no counterpart for (the model's random init, mamba-ssm's choices):
A_log = log U(1, 16) (per-head decay rates), dt from dt_bias = softplus^-1(U_log(0.001, 0.1)) with small
random dt rows in in_proj, D = 1 (skip connection), the gate rows z random N(0, 0.02), norm weight 1.
RoPE has no counterpart (Mamba2 is position-free) and Qwen3's q/k norms are not carried over.
"""

from __future__ import annotations

import torch

from ..mixer_mamba2 import Mamba2
from ..attention_weights import AttentionWeights

CONV_INITS = ("identity", "random")


@torch.no_grad()
def init_mamba_from_attention(mamba: Mamba2, w: AttentionWeights, conv_init: str = "identity") -> dict[str, float]:
    if conv_init not in CONV_INITS:
        raise ValueError(f"student.mamba.conv_init={conv_init!r} is invalid: one of {list(CONV_INITS)}")
    d = mamba.dims
    x_rows, b_rows, c_rows = d.x_heads * d.headdim, d.b_groups * d.d_state, d.c_groups * d.d_state
    start = d.d_inner  # in_proj rows: [z, x, B, C, dt]
    blocks = {"x": (w.v, w.v_bias, x_rows), "B": (w.k, w.k_bias, b_rows), "C": (w.q, w.q_bias, c_rows)}
    for weight, bias, rows in blocks.values():
        mamba.in_proj.weight[start : start + rows] = weight.flatten(0, 1).to(mamba.in_proj.weight.dtype)
        if mamba.in_proj.bias is not None and bias is not None:
            mamba.in_proj.bias[start : start + rows] = bias.flatten().to(mamba.in_proj.bias.dtype)
        start += rows
    mamba.out_proj.weight.copy_(w.o.to(mamba.out_proj.weight.dtype))
    if mamba.out_proj.bias is not None and w.o_bias is not None:
        mamba.out_proj.bias.copy_(w.o_bias.to(mamba.out_proj.bias.dtype))
    if conv_init == "identity":
        mamba.conv1d.weight.zero_()
        mamba.conv1d.weight[:, 0, -1] = 1.0  # the last tap reads the current token
        if mamba.conv1d.bias is not None:
            mamba.conv1d.bias.zero_()
    return {"q_rel_err": 0.0, "k_rel_err": 0.0, "v_rel_err": 0.0}
