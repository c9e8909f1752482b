"""Gated DeltaNet mixer (Yang et al. 2024, "Gated Delta Networks"), one module for training, prefill and decoding.

Per head: q, k, v from projections through a short causal depthwise conv and SiLU (as fla's GatedDeltaNet), q and
k L2-normalized, a decay alpha_t = exp(-exp(A_log) softplus(a_proj(x) + dt_bias)) and a write strength
beta_t = sigmoid(b_proj(x)); the gated delta rule (models/gated_delta.py) gives o_t = S_t q_t; then a per-head
RMSNorm gated by silu(g_proj(x)) and o_proj. Scale 1 on the output: q and k are unit vectors and the norm removes
scale anyway (fla's 1/sqrt(K) would only push short contexts' outputs toward the norm's eps).

GQA grouping (like Mamba2's "gqa" layout): k and v have `num_kv_heads` heads, repeated over each query group, so
the teacher's attention maps one to one: q <- W_q, k <- W_k, v <- W_v, o_proj <- W_o (biases too). The conv runs
over q, k, v before the repetition (a smaller conv state); the recurrent state is per query head (K x V, fp32).

Kernels by the tensors' device: CUDA uses fla's chunk_gated_delta_rule (PyPI `fla-core`) when importable (and, under
autograd, where its backward runs: models/gated_delta.py use_fla), everything else the pure-torch chunked reference;
decoding steps use the torch step on every device.

Initialization from attention, and what it makes the layer at init: the conv is an identity tap, the decay is
constant per token (A_log = 0, dt_bias = softplus^-1(ln 2 / init_half_life), a_proj = 0), beta is the constant
beta_init (b_proj = 0, its bias logit(beta_init)), the gate is constant (g_proj = 0, bias GATE_BIAS) and the norm
weight 1 / silu(GATE_BIAS) cancels it. With q̂, k̂ the normalized SiLU features of the teacher's projections and v
its SiLU values, the delta rule's state is beta_init * sum_s alpha0^(t-s) k̂_s v_s^T up to its erase term, which
is O(beta_init) relative; so, to first order in beta_init, the layer computes
    o_proj( RMSNorm_per_head( beta_init * sum_{s<=t} alpha0^(t-s) (q̂_t . k̂_s) v_s ) )
causal linear attention over the teacher's features, decayed by alpha0 (half-life init_half_life tokens), with
softmax's normalization replaced by the per-head RMSNorm (tests/models/test_gdn.py checks this statement).

The GDN mixer kind, top to bottom: settings (GDNConfig, GDNDims), cache slot, module, initialization from
attention, settings from a teacher, and the registry entry GDN_KIND (models/mixer_kind.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .attention_weights import AttentionWeights
from .conv import causal_conv1d, causal_conv1d_step
from .documents import Documents
from .gated_delta import (
    gated_delta_rule_chunk_ref,
    gated_delta_rule_fla,
    gated_delta_rule_step_ref,
    use_fla,
)
from .mixer_kind import CacheBytes, CacheRequest, InitOptions, MixerKind, config_from_dict
from .norm import GatedRMSNorm
from .output_fit import OutputNormFit

if TYPE_CHECKING:
    from .config import HybridConfig
    from .teacher_spec import TeacherSpec

NAME = "gdn"  # HybridConfig.mixer_types entry and settings key (config.json "gdn", student.gdn); never renamed
GATE_BIAS = 1.0  # init from attention: the output gate starts at the constant silu(1), cancelled by the norm weight


@dataclass
class GDNConfig:
    """Gated DeltaNet mixer. Initialization from attention needs head_k_dim = head_v_dim = the teacher's head_dim
    and the teacher's head counts (None: the model's num_attention_heads / num_key_value_heads)."""

    head_k_dim: int = 64
    head_v_dim: int = 64
    num_heads: int | None = None  # None: the model's num_attention_heads
    num_kv_heads: int | None = None  # k and v heads, repeated over the query groups; None: num_key_value_heads
    d_conv: int = 4  # fla's conv_size
    chunk_size: int = 64  # of the pure-torch chunked form (fla's kernel uses its own, 64)
    qkv_bias: bool = False  # set when the teacher has q/k/v biases
    o_bias: bool = False
    norm_eps: float = 1e-6
    # Random init (fla's GatedDeltaNet): A ~ U(A_init_min, A_init_max), dt log-uniform in [dt_min, dt_max].
    A_init_min: float = 1.0
    A_init_max: float = 16.0
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    # Init from attention: small beta keeps the delta rule's erase term (relative size ~ beta) small, so the layer
    # starts as decayed linear attention; a long half-life keeps the decay close to none.
    beta_init: float = 0.05
    init_half_life: float = 2048.0  # tokens
    use_triton: bool = True  # fla's Triton kernels on CUDA tensors when importable

    def heads(self, num_attention_heads: int) -> int:
        return self.num_heads or num_attention_heads

    def kv_heads(self, num_key_value_heads: int) -> int:
        return self.num_kv_heads or num_key_value_heads

    def validate(self, num_attention_heads: int, num_key_value_heads: int) -> None:
        def bad(key: str, allowed: str) -> ValueError:
            return ValueError(f"{NAME}.{key}={getattr(self, key)!r} is invalid: {allowed}")

        for key in ("head_k_dim", "head_v_dim", "d_conv", "chunk_size"):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1")
        heads = self.heads(num_attention_heads)
        if heads % self.kv_heads(num_key_value_heads):
            raise bad("num_kv_heads", f"must divide num_heads={heads}")
        if not 0.0 < self.beta_init < 1.0:
            raise bad("beta_init", "a write strength in (0, 1)")
        if not self.init_half_life > 0:
            raise bad("init_half_life", "a number of tokens > 0")
        if not 0.0 < self.A_init_min <= self.A_init_max:
            raise bad("A_init_min", f"need 0 < A_init_min <= A_init_max={self.A_init_max}")
        if not 0.0 < self.dt_min <= self.dt_max:
            raise bad("dt_min", f"need 0 < dt_min <= dt_max={self.dt_max}")
        if not self.norm_eps > 0:
            raise bad("norm_eps", "must be > 0")


@dataclass(frozen=True)
class GDNDims:
    heads: int
    kv_heads: int
    head_k_dim: int
    head_v_dim: int

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_k_dim

    @property
    def k_dim(self) -> int:
        return self.kv_heads * self.head_k_dim

    @property
    def v_dim(self) -> int:
        return self.kv_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:  # the conv runs over q, k, v before k and v are repeated
        return self.q_dim + self.k_dim + self.v_dim

    @property
    def value_dim(self) -> int:  # output width, per query head
        return self.heads * self.head_v_dim


def gdn_dims(config: HybridConfig) -> GDNDims:
    s = config.mixer_settings(NAME)
    return GDNDims(
        s.heads(config.num_attention_heads), s.kv_heads(config.num_key_value_heads), s.head_k_dim, s.head_v_dim
    )


@dataclass
class GDNLayerCache:
    conv_state: torch.Tensor  # (B, conv_dim, d_conv - 1), the last inputs of the causal conv
    recurrent_state: torch.Tensor  # (B, heads, head_k_dim, head_v_dim), fp32 so long decodes do not drift

    def tensors(self) -> list[torch.Tensor]:
        return [self.conv_state, self.recurrent_state]

    def reorder(self, index: torch.Tensor) -> None:
        self.conv_state = self.conv_state.index_select(0, index.to(self.conv_state.device))
        self.recurrent_state = self.recurrent_state.index_select(0, index.to(self.recurrent_state.device))


def split_qkv(qkv: torch.Tensor, d: GDNDims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(..., conv_dim) after conv and SiLU -> q, k (..., heads, K) L2-normalized, v (..., heads, V); k and v are
    repeated over the query groups (head h reads KV head h // group, as transformers' repeat_kv)."""
    q, k, v = torch.split(qkv, [d.q_dim, d.k_dim, d.v_dim], dim=-1)
    group = d.heads // d.kv_heads
    wide = torch.promote_types(qkv.dtype, torch.float32)  # the norm in fp32 at least (bf16 training)
    q = F.normalize(q.unflatten(-1, (d.heads, d.head_k_dim)).to(wide), dim=-1).to(q.dtype)
    k = F.normalize(k.unflatten(-1, (d.kv_heads, d.head_k_dim)).to(wide), dim=-1).to(k.dtype)
    v = v.unflatten(-1, (d.kv_heads, d.head_v_dim))
    return q, k.repeat_interleave(group, dim=-2), v.repeat_interleave(group, dim=-2)


class GatedDeltaNet(nn.Module):
    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        s, d = config.mixer_settings(NAME), gdn_dims(config)
        self.dims = d
        self.chunk_size = s.chunk_size
        self.use_triton = s.use_triton
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, d.q_dim, bias=s.qkv_bias)
        self.k_proj = nn.Linear(hidden, d.k_dim, bias=s.qkv_bias)
        self.v_proj = nn.Linear(hidden, d.v_dim, bias=s.qkv_bias)
        self.a_proj = nn.Linear(hidden, d.heads, bias=False)  # decay input; its bias is dt_bias
        self.b_proj = nn.Linear(hidden, d.heads, bias=True)  # beta logits; the bias sets beta at init
        self.g_proj = nn.Linear(hidden, d.value_dim, bias=True)  # output gate; the bias sets it constant at init
        self.conv1d = nn.Conv1d(d.conv_dim, d.conv_dim, s.d_conv, groups=d.conv_dim, padding=s.d_conv - 1)
        self.A_log = nn.Parameter(torch.zeros(d.heads))
        self.dt_bias = nn.Parameter(torch.zeros(d.heads))
        # Per-head RMSNorm of o, then * silu(gate): the grouped, gated norm with one group per head.
        self.o_norm = GatedRMSNorm(d.value_dim, eps=s.norm_eps, groups=d.heads, norm_before_gate=True)
        self.o_proj = nn.Linear(d.value_dim, hidden, bias=s.o_bias)

    def _gates(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log decay g <= 0, beta), (..., heads) in fp32."""
        g = -torch.exp(self.A_log.float()) * F.softplus(self.a_proj(hidden).float() + self.dt_bias.float())
        return g, torch.sigmoid(self.b_proj(hidden).float())

    def forward(self, hidden: torch.Tensor, docs: Documents, cache: GDNLayerCache | None = None) -> torch.Tensor:
        d = self.dims
        qkv = torch.cat([self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden)], dim=-1)  # (B, T, conv_dim)
        g, beta = self._gates(hidden)  # (B, T, H)
        gate = self.g_proj(hidden)  # (B, T, H * V)
        cached = cache is not None and docs.past_len > 0
        if cached:
            # A row whose first token starts a new document must not inherit the cached state.
            keep = docs.continues_cache
            cache.recurrent_state.mul_(keep[:, None, None, None].to(cache.recurrent_state.dtype))
            cache.conv_state.mul_(keep[:, None, None].to(cache.conv_state.dtype))
            if hidden.shape[1] == 1:
                return self._step(qkv, g, beta, gate, cache)
        seq_idx = None if docs.single_document else docs.seq_idx
        conv_out, conv_state = causal_conv1d(
            qkv.transpose(1, 2),
            self.conv1d.weight[:, 0, :],
            self.conv1d.bias,
            seq_idx,
            cache.conv_state if cached else None,
        )
        q, k, v = split_qkv(F.silu(conv_out.transpose(1, 2)), d)  # (B, T, H, K) x2, (B, T, H, V)
        rule = gated_delta_rule_fla if self.use_triton and use_fla(hidden) else gated_delta_rule_chunk_ref
        result = rule(
            q,
            k,
            v,
            g,
            beta,
            self.chunk_size,
            initial_state=cache.recurrent_state if cached else None,
            seq_idx=seq_idx,
            return_final_state=cache is not None,
        )
        o = result[0] if cache is not None else result
        if cache is not None:
            cache.conv_state.copy_(conv_state)
            cache.recurrent_state.copy_(result[1])
        return self.o_proj(self.o_norm(o.flatten(-2).to(gate.dtype), gate))  # (B, T, hidden)

    def _step(self, qkv, g, beta, gate, cache: GDNLayerCache) -> torch.Tensor:
        """One token per row: conv and recurrent states advance in place."""
        w = self.conv1d.weight[:, 0, :]
        q, k, v = split_qkv(F.silu(causal_conv1d_step(qkv[:, 0], cache.conv_state, w, self.conv1d.bias)), self.dims)
        o = gated_delta_rule_step_ref(cache.recurrent_state, q, k, v, g[:, 0], beta[:, 0])  # (B, H, V)
        return self.o_proj(self.o_norm(o.flatten(-2)[:, None].to(gate.dtype), gate))  # (B, 1, hidden)


# ------------------------------------------------------------------------------ initialization from attention


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


@torch.no_grad()
def init_gdn_from_attention(module: GatedDeltaNet, w: AttentionWeights, settings: GDNConfig) -> dict[str, float]:
    """q, k, v, o from the teacher's projections (GQA grouping kept); gates as the module docstring states."""
    d = module.dims
    expected = {"q": (d.heads, d.head_k_dim), "k": (d.kv_heads, d.head_k_dim), "v": (d.kv_heads, d.head_v_dim)}
    for name, shape in expected.items():
        if tuple(getattr(w, name).shape[:2]) != shape:
            raise ValueError(
                f"{NAME}: teacher {name} heads {tuple(getattr(w, name).shape[:2])} do not fit (heads, dim) {shape}"
            )
    for proj, weight, bias in (
        (module.q_proj, w.q, w.q_bias),
        (module.k_proj, w.k, w.k_bias),
        (module.v_proj, w.v, w.v_bias),
    ):
        proj.weight.copy_(weight.flatten(0, 1))
        if proj.bias is not None:
            proj.bias.copy_(bias.flatten() if bias is not None else torch.zeros_like(proj.bias))
    module.o_proj.weight.copy_(w.o)
    if module.o_proj.bias is not None:
        module.o_proj.bias.copy_(w.o_bias if w.o_bias is not None else torch.zeros_like(module.o_proj.bias))
    module.conv1d.weight.zero_()
    module.conv1d.weight[:, 0, -1] = 1.0  # the last tap reads the current token
    module.conv1d.bias.zero_()
    module.a_proj.weight.zero_()
    module.A_log.zero_()  # A = 1: the log decay per token is -softplus(dt_bias)
    module.dt_bias.fill_(_inverse_softplus(math.log(2.0) / settings.init_half_life))
    module.b_proj.weight.zero_()
    module.b_proj.bias.fill_(math.log(settings.beta_init / (1.0 - settings.beta_init)))
    module.g_proj.weight.zero_()
    module.g_proj.bias.fill_(GATE_BIAS)
    module.o_norm.weight.fill_(1.0 / F.silu(torch.tensor(GATE_BIAS, dtype=torch.float64)).item())
    return {"q_rel_err": 0.0, "k_rel_err": 0.0, "v_rel_err": 0.0}  # the maps are copied exactly


# ---------------------------------------------------------------------------------- settings from a teacher


def student_settings(spec: TeacherSpec, gdn: dict, options: InitOptions) -> GDNConfig:
    """`student.gdn` completed from the teacher: head sizes for the mapping from attention, biases."""
    gdn = dict(gdn)
    gdn.setdefault("head_k_dim", spec.head_dim)
    gdn.setdefault("head_v_dim", spec.head_dim)
    gdn.setdefault("qkv_bias", spec.qkv_bias)
    gdn.setdefault("o_bias", spec.o_bias)
    return config_from_dict(GDNConfig, gdn)


def check_gdn_fits(spec: TeacherSpec, gdn: GDNConfig) -> None:
    """The attention -> GDN mapping needs the teacher's head sizes and counts."""
    gdn.validate(spec.num_heads, spec.num_kv_heads)
    expected = {
        "head_k_dim": (gdn.head_k_dim, spec.head_dim),
        "head_v_dim": (gdn.head_v_dim, spec.head_dim),
        "num_heads": (gdn.heads(spec.num_heads), spec.num_heads),
        "num_kv_heads": (gdn.kv_heads(spec.num_kv_heads), spec.num_kv_heads),
    }
    for key, (value, want) in expected.items():
        if value != want:
            raise ValueError(
                f"student.{NAME}.{key}={getattr(gdn, key)!r} does not fit initialization from the teacher's "
                f"attention: it must be {want!r} (q <- W_q, k <- W_k, v <- W_v per teacher head)"
            )


# --------------------------------------------------------------------------------------------- registry entry


def _call(module: GatedDeltaNet, hidden, cos, sin, docs: Documents, cache: GDNLayerCache | None) -> torch.Tensor:
    return module(hidden, docs, cache)  # position-free: no RoPE


def _validate(gdn: GDNConfig, config: HybridConfig) -> None:
    gdn.validate(config.num_attention_heads, config.num_key_value_heads)


def _make_cache(config: HybridConfig, layer_idx: int, request: CacheRequest) -> GDNLayerCache:
    """Constant size: the conv's last d_conv-1 inputs and the recurrent state (in `state_dtype`), zeros."""
    d, d_conv, batch = gdn_dims(config), config.mixer_settings(NAME).d_conv, request.batch_size
    conv_state = torch.zeros(batch, d.conv_dim, d_conv - 1, dtype=request.dtype, device=request.device)
    state = torch.zeros(batch, d.heads, d.head_k_dim, d.head_v_dim, dtype=request.state_dtype, device=request.device)
    return GDNLayerCache(conv_state=conv_state, recurrent_state=state)


def _cache_bytes(config: HybridConfig, layer_idx: int, dtype: torch.dtype, state_dtype: torch.dtype) -> CacheBytes:
    """Nothing per token; a constant conv + recurrent state per sequence."""
    d, d_conv = gdn_dims(config), config.mixer_settings(NAME).d_conv
    conv = d.conv_dim * (d_conv - 1) * dtype.itemsize
    state = d.heads * d.head_k_dim * d.head_v_dim * state_dtype.itemsize
    return CacheBytes(per_token=0, constant=conv + state)


def _extra_flops(module: GatedDeltaNet, context: float) -> int:
    """The chunked form per head and token, chunk Q: Q (3K + 2V) for the causal intra-chunk products (K K^T, the
    triangular solve over [V, K], Q K^T, then times U; each half a Q x Q block) plus 6 K V for the state (W h0,
    Q h0, K^T U); plus the depthwise conv. Context-free."""
    d, q = module.dims, module.chunk_size
    rule = d.heads * (q * (3 * d.head_k_dim + 2 * d.head_v_dim) + 6 * d.head_k_dim * d.head_v_dim)
    return rule + 2 * d.conv_dim * module.conv1d.kernel_size[0]


@torch.no_grad()
def _init_weights(module: GatedDeltaNet, config: HybridConfig) -> None:
    """fla's init of what has no nn.Linear counterpart; `init.*` skips tensors loaded from a checkpoint."""
    s = config.mixer_settings(NAME)
    heads = module.dims.heads
    log_dt = torch.rand(heads) * (math.log(s.dt_max) - math.log(s.dt_min)) + math.log(s.dt_min)
    dt = torch.exp(log_dt).clamp(min=s.dt_init_floor)
    init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
    init.copy_(module.A_log, torch.log(torch.empty(heads).uniform_(s.A_init_min, s.A_init_max)))


def _check_fits(spec: TeacherSpec, gdn: GDNConfig, options: InitOptions) -> None:
    check_gdn_fits(spec, gdn)


def _plan_init(
    config: HybridConfig, spec: TeacherSpec, weights: dict[int, AttentionWeights], options: InitOptions
) -> dict[int, Any]:
    return {}  # each layer maps on its own


def _calibration(module: GatedDeltaNet) -> OutputNormFit:
    return OutputNormFit(module, module.o_norm, module.o_proj, _call)


def _init_from_attention(
    module: GatedDeltaNet, w: AttentionWeights, config: HybridConfig, planned: Any, options: InitOptions
) -> dict[str, Any]:
    return init_gdn_from_attention(module, w, config.mixer_settings(NAME))


GDN_KIND = MixerKind(
    name=NAME,
    module=GatedDeltaNet,
    attribute="gdn",  # state-dict keys model.layers.<i>.gdn.*: checkpoints depend on it
    settings=GDNConfig,
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
    calibration=_calibration,  # the output norm's weight: the output scale per channel
    constant_state=True,
    # Not in the default candidate set (runs stay as they were): `select.fill_kinds=[mamba,gdn]` makes ILD align it
    # and SMART compare it per layer; users place it by hand with student.layers ({3: gdn}).
    candidate=False,
)
