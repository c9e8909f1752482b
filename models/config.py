"""HybridConfig: the student's architecture, a transformers `PretrainedConfig`.

The student keeps the teacher's trunk (embeddings, norms, SwiGLU MLPs, RoPE table) and replaces every
attention layer by either MLA or Mamba2, as `mixer_types` says. The two mixers' dimensions live in the
`mla` and `mamba` dicts (plain dicts so that config.json stays readable and round-trips); `mla_config`
and `mamba_config` give them back as typed, validated dataclasses.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from transformers import PretrainedConfig

MIXER_TYPES = ("mla", "mamba")


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2 style, X-EcoMLA initializable).

    Per token the cache holds the latent (`kv_lora_rank`) plus `num_rope_heads * qk_rope_head_dim`
    RoPE key values; keys' nope part and values are up-projected from the latent.
    """

    kv_lora_rank: int = 128
    # Per-layer latent ranks (index = layer; entries of Mamba2 layers unused), e.g. from the energy rule.
    kv_lora_ranks: list[int] | None = None
    q_lora_rank: int | None = None  # None: full-rank q_proj (as in Zebra-Llama 1B/3B)
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    # "shared": one RoPE key head for all query heads (DeepSeek); "per_kv_head": one per teacher KV head.
    rope_heads: str = "shared"
    # "gqa": one up-projection per teacher KV head, repeated over its query group; "per_head": one per head.
    kv_up_layout: str = "gqa"
    latent_norm: bool = False  # RMSNorm on the KV latent (DeepSeek has it; SVD init is exact without it)
    q_latent_norm: bool = False  # RMSNorm on the query latent when q_lora_rank is set
    qkv_bias: bool = False  # teacher q/k/v biases (Qwen2) land on q, the RoPE key and the up-projection
    o_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on queries and RoPE keys before rotation (Qwen3)
    softmax_scale: float | None = None  # None: 1/sqrt(qk_nope_head_dim + qk_rope_head_dim)
    # Which of the teacher's head_dim/2 rotation frequencies the rope_dim/2 student pairs use.
    # None: evenly spaced, which for plain RoPE equals a fresh RoPE of qk_rope_head_dim with the same theta.
    rope_freq_indices: list[int] | None = None
    lossless: bool = False  # set by the init code; documents that dims were chosen to reproduce the teacher

    def validate(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        def bad(key: str, value: Any, allowed: str) -> ValueError:
            return ValueError(f"mla.{key}={value!r} is invalid: {allowed}")

        if self.kv_lora_rank < 1:
            raise bad("kv_lora_rank", self.kv_lora_rank, "must be >= 1")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise bad("q_lora_rank", self.q_lora_rank, "must be >= 1 or null")
        if self.qk_rope_head_dim < 2 or self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", self.qk_rope_head_dim, "must be an even number >= 2")
        if self.qk_rope_head_dim > head_dim:
            raise bad("qk_rope_head_dim", self.qk_rope_head_dim, f"must be <= the teacher head_dim {head_dim}")
        if self.qk_nope_head_dim < 0 or self.v_head_dim < 1:
            raise bad("qk_nope_head_dim/v_head_dim", (self.qk_nope_head_dim, self.v_head_dim), "must be >= 0 / >= 1")
        if self.rope_heads not in ("shared", "per_kv_head"):
            raise bad("rope_heads", self.rope_heads, "one of 'shared', 'per_kv_head'")
        if self.kv_up_layout not in ("gqa", "per_head"):
            raise bad("kv_up_layout", self.kv_up_layout, "one of 'gqa', 'per_head'")
        if num_heads % num_kv_heads:
            raise bad("num_kv_heads", num_kv_heads, f"must divide num_attention_heads={num_heads}")
        if self.rope_freq_indices is not None:
            idx = list(self.rope_freq_indices)
            if len(idx) != self.qk_rope_head_dim // 2 or not all(0 <= i < head_dim // 2 for i in idx):
                raise bad(
                    "rope_freq_indices",
                    idx,
                    f"need {self.qk_rope_head_dim // 2} indices in [0, {head_dim // 2})",
                )

    def rank(self, layer_idx: int) -> int:
        if self.kv_lora_ranks is not None and self.kv_lora_ranks[layer_idx]:
            return int(self.kv_lora_ranks[layer_idx])
        return self.kv_lora_rank

    def num_rope_heads(self, num_kv_heads: int) -> int:
        return 1 if self.rope_heads == "shared" else num_kv_heads

    def num_up_heads(self, num_heads: int, num_kv_heads: int) -> int:
        return num_kv_heads if self.kv_up_layout == "gqa" else num_heads

    def freq_indices(self, head_dim: int) -> list[int]:
        if self.rope_freq_indices is not None:
            return list(self.rope_freq_indices)
        step = head_dim / self.qk_rope_head_dim
        return [int(math.floor(j * step)) for j in range(self.qk_rope_head_dim // 2)]


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
    in_proj_bias: bool = False  # set when the teacher has q/k/v biases
    out_proj_bias: bool = False
    norm_groups: int = 1  # gated RMSNorm groups over d_inner
    norm_before_gate: bool = False  # mamba-ssm's Mamba2 default
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    A_init_range: tuple[float, float] = (1.0, 16.0)
    use_triton: bool = True  # mamba-ssm Triton kernels on CUDA tensors when importable

    def heads(self, num_attention_heads: int) -> int:
        return self.num_heads or num_attention_heads

    def validate(self, num_attention_heads: int, num_kv_heads: int) -> None:
        def bad(key: str, value: Any, allowed: str) -> ValueError:
            return ValueError(f"mamba.{key}={value!r} is invalid: {allowed}")

        nheads = self.heads(num_attention_heads)
        for key in ("d_state", "headdim", "d_conv", "chunk_size"):
            if getattr(self, key) < 1:
                raise bad(key, getattr(self, key), "must be >= 1")
        if self.layout not in ("gqa", "standard"):
            raise bad("layout", self.layout, "one of 'gqa', 'standard'")
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


def config_from_dict(cls, value: Any):
    """A dataclass from a dict, naming unknown keys."""
    if isinstance(value, cls):
        return value
    value = dict(value or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; allowed: {sorted(known)}")
    for key in ("dt_limit", "A_init_range"):
        if key in value and value[key] is not None:
            value[key] = tuple(float(v) for v in value[key])
    return cls(**value)


class HybridConfig(PretrainedConfig):
    """Configuration of `HybridForCausalLM`: a decoder whose layer i is MLA or Mamba2 by `mixer_types[i]`.

    (Not `layer_types`: transformers validates and rewrites that attribute for its own attention kinds.)
    """

    model_type = "zebra_hybrid"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 256,
        intermediate_size: int = 688,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        mlp_bias: bool = False,
        rms_norm_eps: float = 1e-5,
        max_position_embeddings: int = 2048,
        rope_parameters: dict | None = None,
        mixer_types: list[str] | None = None,
        mla: dict | None = None,
        mamba: dict | None = None,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.mlp_bias = mlp_bias
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        # The teacher's RoPE (transformers 5 `rope_parameters` form): rope_type, rope_theta and scaling keys.
        self.rope_parameters = dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
        self.mixer_types = list(mixer_types) if mixer_types is not None else ["mla"] * num_hidden_layers
        self.mla = asdict(config_from_dict(MLAConfig, mla))
        self.mamba = asdict(config_from_dict(MambaConfig, mamba))
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_hybrid()

    @property
    def mla_config(self) -> MLAConfig:
        return config_from_dict(MLAConfig, self.mla)

    @property
    def mamba_config(self) -> MambaConfig:
        return config_from_dict(MambaConfig, self.mamba)

    @property
    def mamba_dims(self) -> MambaDims:
        m = self.mamba_config
        nheads = m.heads(self.num_attention_heads)
        if m.layout == "gqa":
            kv = self.num_key_value_heads
            return MambaDims(nheads, m.headdim, m.d_state, x_heads=kv, b_groups=kv, c_groups=nheads)
        return MambaDims(nheads, m.headdim, m.d_state, x_heads=nheads, b_groups=m.ngroups, c_groups=m.ngroups)

    @property
    def mla_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.mixer_types) if t == "mla"]

    def validate_hybrid(self) -> None:
        """Raise ValueError naming the key and what is allowed; called on construction."""
        if len(self.mixer_types) != self.num_hidden_layers:
            raise ValueError(
                f"mixer_types has {len(self.mixer_types)} entries, num_hidden_layers={self.num_hidden_layers}"
            )
        bad = [t for t in self.mixer_types if t not in MIXER_TYPES]
        if bad:
            raise ValueError(f"mixer_types contains {bad}; allowed: {list(MIXER_TYPES)}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if "mla" in self.mixer_types:
            self.mla_config.validate(self.num_attention_heads, self.num_key_value_heads, self.head_dim)
        if "mamba" in self.mixer_types:
            self.mamba_config.validate(self.num_attention_heads, self.num_key_value_heads)


__all__ = ["HybridConfig", "MLAConfig", "MambaConfig", "MambaDims", "MIXER_TYPES"]
