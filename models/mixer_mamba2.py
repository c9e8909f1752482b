"""Mamba2 mixer (SSD), one module for training, prefill and decoding.

Layouts: "standard" is mamba-ssm's (x per head, B and C shared by `ngroups` groups); "gqa" is
Zebra-Llama's / MambaInLlama's (x and B per teacher KV head, repeated over the query group; C per head),
so the teacher's attention maps onto it: x <- W_v, B <- W_k, C <- W_q, out_proj <- W_o.
Parameter names follow mamba-ssm (in_proj, conv1d, dt_bias, A_log, D, norm, out_proj).

Kernels are chosen per call by the tensors' device: CUDA tensors use mamba-ssm's Triton chunked scan,
state update and gated norm when importable; everything else runs the pure-torch twins in models/ssd.py.

Initialization from the same layer's attention (the MambaInLlama / Zebra-Llama mapping), GQA layout.

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
import torch.nn.functional as F
from torch import nn

from .attention_weights import AttentionWeights
from .cache import MambaLayerCache
from .compile import compiled_in_training
from .config import HybridConfig, MambaDims
from .conv import causal_conv1d, causal_conv1d_step
from .documents import Documents
from .kernels import triton_chunk_scan, triton_state_update
from .norm import GatedRMSNorm
from .ssd import selective_state_update_ref, ssd_chunk_scan_ref


def split_xbc(xbc: torch.Tensor, d: MambaDims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(..., conv_dim) -> x (..., nheads, P), B and C (..., c_groups, N), repeated to kernel shapes."""
    x, b, c = torch.split(xbc, [d.x_heads * d.headdim, d.b_groups * d.d_state, d.c_groups * d.d_state], dim=-1)
    x = x.unflatten(-1, (d.x_heads, d.headdim)).repeat_interleave(d.nheads // d.x_heads, dim=-2)
    b = b.unflatten(-1, (d.b_groups, d.d_state)).repeat_interleave(d.c_groups // d.b_groups, dim=-2)
    c = c.unflatten(-1, (d.c_groups, d.d_state))
    return x, b, c


@compiled_in_training
def conv_silu_split(xbc, weight, bias, seq_idx, initial_state, dims: MambaDims):
    """xbc (B, T, conv_dim) -> x, B, C of `split_xbc` after the document-masked conv and SiLU, and the conv
    state. One function so that torch.compile fuses the conv's masked taps, the SiLU and the head repeats."""
    conv_out, conv_state = causal_conv1d(xbc.transpose(1, 2), weight, bias, seq_idx, initial_state)
    return (*split_xbc(F.silu(conv_out.transpose(1, 2)), dims), conv_state)


class Mamba2(nn.Module):
    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        m, dims = config.mamba_config, config.mamba_dims
        self.dims = dims
        self.chunk_size = m.chunk_size
        self.dt_limit = tuple(m.dt_limit)
        self.use_triton = m.use_triton
        # in_proj output: [z (d_inner), x (x_heads*P), B (b_groups*N), C (c_groups*N), dt (nheads)]
        self.in_proj = nn.Linear(config.hidden_size, dims.d_inner + dims.conv_dim + dims.nheads, bias=m.in_proj_bias)
        self.conv1d = nn.Conv1d(
            dims.conv_dim,
            dims.conv_dim,
            m.d_conv,
            groups=dims.conv_dim,
            padding=m.d_conv - 1,
            bias=m.conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.zeros(dims.nheads))
        self.A_log = nn.Parameter(torch.zeros(dims.nheads))
        self.D = nn.Parameter(torch.ones(dims.nheads))
        self.norm = GatedRMSNorm(dims.d_inner, eps=1e-5, groups=m.norm_groups, norm_before_gate=m.norm_before_gate)
        self.out_proj = nn.Linear(dims.d_inner, config.hidden_size, bias=m.out_proj_bias)

    def _triton(self, getter, tensor: torch.Tensor):
        return getter() if (self.use_triton and tensor.is_cuda) else None

    def forward(self, hidden: torch.Tensor, docs: Documents, cache: MambaLayerCache | None = None) -> torch.Tensor:
        batch, length, _ = hidden.shape
        d = self.dims
        z, xbc, dt = torch.split(self.in_proj(hidden), [d.d_inner, d.conv_dim, d.nheads], dim=-1)
        if cache is not None and docs.past_len > 0:
            # A row whose first token starts a new document must not inherit the cached state.
            keep = docs.continues_cache.to(cache.ssm_state.dtype)
            cache.ssm_state.mul_(keep[:, None, None, None])
            cache.conv_state.mul_(keep[:, None, None].to(cache.conv_state.dtype))
            if length == 1:
                return self._step(z, xbc, dt, cache)
        seq_idx = None if docs.single_document else docs.seq_idx
        x, b, c, conv_state = conv_silu_split(  # (B, T, H, P), (B, T, G, N) x2
            xbc,
            self.conv1d.weight[:, 0, :],
            self.conv1d.bias,
            seq_idx,
            cache.conv_state if cache is not None and docs.past_len > 0 else None,
            d,
        )
        initial = cache.ssm_state if cache is not None and docs.past_len > 0 else None
        scan = self._triton(triton_chunk_scan, hidden) or ssd_chunk_scan_ref
        result = scan(
            x,
            dt,
            -torch.exp(self.A_log.float()),
            b,
            c,
            self.chunk_size,
            D=self.D,
            z=None,
            dt_bias=self.dt_bias,
            initial_states=initial,
            seq_idx=seq_idx,
            dt_softplus=True,
            dt_limit=self.dt_limit,
            return_final_states=cache is not None,
        )
        y = result[0] if cache is not None else result
        if cache is not None:
            cache.conv_state.copy_(conv_state)
            cache.ssm_state.copy_(result[1])
        y = self.norm(y.flatten(-2), z)  # (B, T, d_inner)
        return self.out_proj(y)

    def _step(self, z: torch.Tensor, xbc: torch.Tensor, dt: torch.Tensor, cache: MambaLayerCache) -> torch.Tensor:
        """One token per row: conv and SSM states advance in place."""
        d = self.dims
        xbc = F.silu(causal_conv1d_step(xbc[:, 0], cache.conv_state, self.conv1d.weight[:, 0, :], self.conv1d.bias))
        x, b, c = split_xbc(xbc, d)  # (B, H, P), (B, G, N), (B, G, N)
        # softplus and the dt limits in torch (mamba-ssm's step kernel has no limits), identical to the scan.
        dt = F.softplus(dt[:, 0].float() + self.dt_bias.float())
        if self.dt_limit != (0.0, float("inf")):
            dt = dt.clamp(*self.dt_limit)
        a = -torch.exp(self.A_log.float())
        update = self._triton(triton_state_update, xbc) or selective_state_update_ref
        y = update(
            cache.ssm_state,
            x,
            dt[..., None].expand(-1, -1, d.headdim),
            a[:, None, None].expand(-1, d.headdim, d.d_state),
            b,
            c,
            D=self.D[:, None].expand(-1, d.headdim),
            # mamba-ssm 2.3's kernel reads dt_bias's strides even when it adds nothing: pass explicit zeros.
            dt_bias=dt.new_zeros(()).expand(d.nheads, d.headdim),
        )
        y = self.norm(y.flatten(-2)[:, None].to(z.dtype), z)  # (B, 1, d_inner)
        return self.out_proj(y)


# -------------------------------------------------------------------------------- Initialization from attention


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
