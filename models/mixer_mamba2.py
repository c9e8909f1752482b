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
random dt rows in in_proj, D = 1 (skip connection), norm weight 1. The gate: `gate_init="constant"` zeroes its
rows and puts a constant in in_proj's bias, so silu(z) is the same for every channel and token and the gated
norm passes the linear-attention output through unscaled; "random" keeps MambaInLlama's random rows, which
multiply each channel by an unrelated factor (on SmolLM2 that init is worse than no mixer at all, docs/fidelity.md).
What weights alone cannot set, the output scale per channel, `OutputNormFit` fits to the teacher's attention
outputs on real text (models/init/calibrate.py). RoPE has no counterpart (Mamba2 is position-free) and Qwen3's
q/k norms are not carried over.

The Mamba2 mixer kind, top to bottom: settings (MambaConfig, MambaDims), cache slot, module, initialization
from attention, settings from a teacher, and the registry entry MAMBA2_KIND (models/mixer_kind.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .attention_weights import AttentionWeights
from .compile import compiled_in_training
from .conv import causal_conv1d, causal_conv1d_step
from .documents import Documents
from .kernels import triton_chunk_scan, triton_state_update
from .mixer_kind import CacheBytes, CacheRequest, InitOptions, MixerKind, config_from_dict
from .norm import GatedRMSNorm
from .output_fit import OutputNormFit
from .ssd import selective_state_update_ref, ssd_chunk_scan_ref

if TYPE_CHECKING:
    from .config import HybridConfig
    from .teacher_spec import TeacherSpec

NAME = "mamba"  # HybridConfig.mixer_types entry and settings key (config.json "mamba", student.mamba); never renamed


LAYOUTS = ("gqa", "standard")  # mamba.layout: Zebra-Llama's (x, B per teacher KV head) or mamba-ssm's
GATE_INITS = ("constant", "random")  # mamba.gate_init, see the module docstring
GATE_BIAS = 1.0  # gate_init="constant": z = 1 everywhere; silu(1) = 0.73, and the norm divides the constant out


@dataclass
class MambaConfig:
    """Mamba2 mixer. `layout="gqa"` is Zebra-Llama's: x and B per teacher KV head (repeated over the
    query group), C per head, so x <- W_v, B <- W_k, C <- W_q, out_proj <- W_o map one to one."""

    d_state: int = 64
    headdim: int = 64
    num_heads: int | None = None  # None: the teacher's num_attention_heads
    layout: str = "gqa"  # "gqa" or "standard" (mamba-ssm: x per head, B and C in `ngroups` groups)
    ngroups: int = 1  # standard layout only
    d_conv: int = 4
    chunk_size: int = 256
    conv_bias: bool = True
    in_proj_bias: bool = False  # from a teacher: for gate_init=constant (its bias) or the teacher's q/k/v biases
    out_proj_bias: bool = False
    norm_groups: int = 1  # gated RMSNorm groups over d_inner
    norm_before_gate: bool = False  # mamba-ssm's Mamba2 default
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    A_init_range: tuple[float, float] = (1.0, 16.0)
    gate_init: str = "constant"  # initialization from attention: "constant" (needs in_proj_bias) | "random"
    use_triton: bool = True  # mamba-ssm Triton kernels on CUDA tensors when importable

    def __post_init__(self) -> None:
        for key in ("dt_limit", "A_init_range"):  # lists from config.json or YAML
            if getattr(self, key) is not None:
                setattr(self, key, tuple(float(v) for v in getattr(self, key)))

    def heads(self, num_attention_heads: int) -> int:
        return self.num_heads or num_attention_heads

    def validate(self, num_attention_heads: int, num_kv_heads: int) -> None:
        def bad(key: str, value: Any, allowed: str) -> ValueError:
            return ValueError(f"mamba.{key}={value!r} is invalid: {allowed}")

        nheads = self.heads(num_attention_heads)
        for key in ("d_state", "headdim", "d_conv", "chunk_size"):
            if getattr(self, key) < 1:
                raise bad(key, getattr(self, key), "must be >= 1")
        if self.layout not in LAYOUTS:
            raise bad("layout", self.layout, "one of " + ", ".join(map(repr, LAYOUTS)))
        if self.gate_init not in GATE_INITS:
            raise bad("gate_init", self.gate_init, "one of " + ", ".join(map(repr, GATE_INITS)))
        groups = num_kv_heads if self.layout == "gqa" else self.ngroups
        if nheads % groups:
            raise bad(
                "ngroups" if self.layout == "standard" else "layout",
                groups,
                f"must divide num_heads={nheads}",
            )
        if (nheads * self.headdim) % self.norm_groups:
            raise bad("norm_groups", self.norm_groups, f"must divide d_inner={nheads * self.headdim}")
        lo, hi = self.dt_limit
        if not 0.0 <= lo < hi:
            raise bad("dt_limit", self.dt_limit, "need 0 <= low < high")


@dataclass(frozen=True)
class MambaDims:
    """Derived Mamba2 sizes. x has `x_heads` heads and B has `b_groups` groups before being repeated up to
    `nheads` / `c_groups`; the conv runs over x, B and C before repetition (a smaller conv state)."""

    nheads: int
    headdim: int
    d_state: int
    x_heads: int
    b_groups: int
    c_groups: int

    @property
    def d_inner(self) -> int:
        return self.nheads * self.headdim

    @property
    def conv_dim(self) -> int:
        return self.x_heads * self.headdim + (self.b_groups + self.c_groups) * self.d_state


def mamba_dims(config: HybridConfig) -> MambaDims:
    m = config.mixer_settings(NAME)
    nheads = m.heads(config.num_attention_heads)
    if m.layout == "gqa":
        kv = config.num_key_value_heads
        return MambaDims(nheads, m.headdim, m.d_state, x_heads=kv, b_groups=kv, c_groups=nheads)
    return MambaDims(nheads, m.headdim, m.d_state, x_heads=nheads, b_groups=m.ngroups, c_groups=m.ngroups)


@dataclass
class MambaLayerCache:
    conv_state: torch.Tensor  # (B, conv_dim, d_conv - 1), the last inputs of the causal conv
    ssm_state: torch.Tensor  # (B, nheads, headdim, d_state), fp32 so long decodes do not drift

    def tensors(self) -> list[torch.Tensor]:
        return [self.conv_state, self.ssm_state]

    def reorder(self, index: torch.Tensor) -> None:
        self.conv_state = self.conv_state.index_select(0, index.to(self.conv_state.device))
        self.ssm_state = self.ssm_state.index_select(0, index.to(self.ssm_state.device))


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
        m, dims = config.mixer_settings(NAME), mamba_dims(config)
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


# ------------------------------------------------------------------------------ initialization from attention


CONV_INITS = ("identity", "random")


@torch.no_grad()
def init_mamba_from_attention(
    mamba: Mamba2, w: AttentionWeights, conv_init: str = "identity", gate_init: str = "constant"
) -> dict[str, float]:
    if conv_init not in CONV_INITS:
        raise ValueError(f"student.mamba.conv_init={conv_init!r} is invalid: one of {list(CONV_INITS)}")
    d = mamba.dims
    if gate_init == "constant":
        if mamba.in_proj.bias is None:
            raise ValueError("student.mamba.gate_init='constant' needs student.mamba.in_proj_bias=true")
        mamba.in_proj.weight[: d.d_inner] = 0.0
        mamba.in_proj.bias[: d.d_inner] = GATE_BIAS
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


# ---------------------------------------------------------------------------------- settings from a teacher


def check_mamba_fits(spec: TeacherSpec, mamba: MambaConfig) -> None:
    """The attention -> Mamba2 mapping needs the GQA layout with the teacher's head sizes."""
    mamba.validate(spec.num_heads, spec.num_kv_heads)
    if mamba.gate_init == "constant" and not mamba.in_proj_bias:
        raise ValueError(
            "student.mamba.in_proj_bias=False does not fit student.mamba.gate_init='constant' (the gate's constant "
            "is in_proj's bias): set in_proj_bias=true (or null), or gate_init='random'"
        )
    expected = {"layout": "gqa", "headdim": spec.head_dim, "d_state": spec.head_dim}
    for key, value in expected.items():
        if getattr(mamba, key) != value:
            raise ValueError(
                f"student.mamba.{key}={getattr(mamba, key)!r} does not fit initialization from the teacher's "
                f"attention: it must be {value!r} (x <- W_v, B <- W_k, C <- W_q per teacher head)"
            )
    if mamba.heads(spec.num_heads) != spec.num_heads:
        raise ValueError(
            f"student.mamba.num_heads={mamba.num_heads} must equal the teacher's num_attention_heads {spec.num_heads}"
        )


def student_settings(spec: TeacherSpec, mamba: dict, options: InitOptions) -> MambaConfig:
    """`student.mamba` completed from the teacher: head sizes for the mapping from attention, biases."""
    mamba = dict(mamba)
    mamba.setdefault("headdim", spec.head_dim)  # the mapping from attention needs the teacher's head size
    mamba.setdefault("d_state", spec.head_dim)
    # The constant gate lives in in_proj's bias (x/B/C take the teacher's q/k/v biases, or zeros).
    mamba.setdefault("in_proj_bias", spec.qkv_bias or mamba.get("gate_init", MambaConfig.gate_init) == "constant")
    mamba.setdefault("out_proj_bias", spec.o_bias)
    return config_from_dict(MambaConfig, mamba)


# --------------------------------------------------------------------------------------------- registry entry


def _call(module: Mamba2, hidden, cos, sin, docs: Documents, cache: MambaLayerCache | None) -> torch.Tensor:
    return module(hidden, docs, cache)  # position-free: no RoPE


def _validate(mamba: MambaConfig, config: HybridConfig) -> None:
    mamba.validate(config.num_attention_heads, config.num_key_value_heads)


def _make_cache(config: HybridConfig, layer_idx: int, request: CacheRequest) -> MambaLayerCache:
    """Constant size: the conv's last d_conv-1 inputs and the SSM state (in `state_dtype`), zeros."""
    dims, d_conv, batch = mamba_dims(config), config.mixer_settings(NAME).d_conv, request.batch_size
    conv_state = torch.zeros(batch, dims.conv_dim, d_conv - 1, dtype=request.dtype, device=request.device)
    ssm_state = torch.zeros(
        batch, dims.nheads, dims.headdim, dims.d_state, dtype=request.state_dtype, device=request.device
    )
    return MambaLayerCache(conv_state=conv_state, ssm_state=ssm_state)


def _cache_bytes(config: HybridConfig, layer_idx: int, dtype: torch.dtype, state_dtype: torch.dtype) -> CacheBytes:
    """Nothing per token; a constant conv + SSM state per sequence."""
    dims, d_conv = mamba_dims(config), config.mixer_settings(NAME).d_conv
    conv = dims.conv_dim * (d_conv - 1) * dtype.itemsize
    ssm = dims.nheads * dims.headdim * dims.d_state * state_dtype.itemsize
    return CacheBytes(per_token=0, constant=conv + ssm)


def _extra_flops(module: Mamba2, context: float) -> int:
    """The chunked SSD scan per head, Q * (N + P) + 4 * N * P, plus the depthwise conv (context-free)."""
    d = module.dims
    scan = d.nheads * (module.chunk_size * (d.d_state + d.headdim) + 4 * d.d_state * d.headdim)
    return scan + 2 * d.conv_dim * module.conv1d.kernel_size[0]


@torch.no_grad()
def _init_weights(module: Mamba2, config: HybridConfig) -> None:
    """mamba-ssm's init of what has no nn.Linear counterpart; `init.*` skips tensors loaded from a checkpoint."""
    m = config.mixer_settings(NAME)
    nheads = module.dims.nheads
    # dt log-uniform in [dt_min, dt_max]; dt_bias is its inverse softplus (mamba-ssm's init).
    dt = torch.exp(
        torch.rand(nheads) * (torch.log(torch.tensor(m.dt_max)) - torch.log(torch.tensor(m.dt_min)))
        + torch.log(torch.tensor(m.dt_min))
    ).clamp(min=m.dt_init_floor)
    init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))
    init.copy_(module.A_log, torch.log(torch.empty(nheads).uniform_(*m.A_init_range)))
    init.ones_(module.D)


def _check_fits(spec: TeacherSpec, mamba: MambaConfig, options: InitOptions) -> None:
    check_mamba_fits(spec, mamba)


def _plan_init(
    config: HybridConfig, spec: TeacherSpec, weights: dict[int, AttentionWeights], options: InitOptions
) -> dict[int, Any]:
    return {}  # each layer maps on its own


def _calibration(module: Mamba2) -> OutputNormFit:
    return OutputNormFit(module, module.norm, module.out_proj, _call)


def _init_from_attention(
    module: Mamba2, w: AttentionWeights, config: HybridConfig, planned: Any, options: InitOptions
) -> dict[str, Any]:
    return init_mamba_from_attention(module, w, options.conv_init, config.mixer_settings(NAME).gate_init)


MAMBA2_KIND = MixerKind(
    name=NAME,
    module=Mamba2,
    attribute="mamba",  # state-dict keys model.layers.<i>.mamba.*: checkpoints depend on it
    settings=MambaConfig,
    validate=_validate,
    call=_call,
    make_cache=_make_cache,
    cache_bytes=_cache_bytes,
    extra_flops=_extra_flops,
    init_weights=_init_weights,
    student_settings=student_settings,
    check_fits=_check_fits,
    plan_init=_plan_init,
    init_from_attention=_init_from_attention,
    reproduces_attention=False,
    calibration=_calibration,  # the gated norm's weight: the output scale per channel
    constant_state=True,
)
