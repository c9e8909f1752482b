"""The student's HybridConfig from a teacher and the user's `student.*` settings, checked against the teacher.

Everything that cannot fit the teacher fails here, with the key, the value and what is allowed, before
any weight is touched.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ..config import HybridConfig, MambaConfig, MLAConfig, config_from_dict
from ..teachers import TeacherSpec


def parse_mla_layers(value: Any, num_layers: int) -> list[int]:
    """`student.mla_layers`: a list of layer indices, "all" or "none"."""
    if isinstance(value, str):
        if value == "all":
            return list(range(num_layers))
        if value == "none":
            return []
        raise ValueError(f"student.mla_layers={value!r} is invalid: a list of layer indices, 'all' or 'none'")
    layers = list(value)
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"student.mla_layers has {bad} outside the teacher's layers: allowed indices 0..{num_layers - 1}"
        )
    if len(set(layers)) != len(layers):
        raise ValueError(f"student.mla_layers={layers} repeats a layer")
    return sorted(layers)


def lossless_mla(spec: TeacherSpec) -> dict:
    """MLA that is the teacher's GQA in MLA form: RoPE over every key dim per KV head, full value rank."""
    return dict(
        kv_lora_rank=spec.num_kv_heads * spec.head_dim,
        q_lora_rank=None,
        qk_nope_head_dim=0,
        qk_rope_head_dim=spec.head_dim,
        v_head_dim=spec.head_dim,
        rope_heads="per_kv_head",
        kv_up_layout="gqa",
        latent_norm=False,
        rope_freq_indices=list(range(spec.head_dim // 2)),
        lossless=True,
    )


def max_kv_rank(spec: TeacherSpec, mla: MLAConfig) -> int:
    """The rank of [W_k (nope rows); W_v] can be at most min(hidden, rows)."""
    rows = spec.num_kv_heads * (mla.qk_nope_head_dim + spec.head_dim)
    return min(spec.hidden_size, rows)


def build_student_config(
    spec: TeacherSpec,
    mla_layers: Any = "all",
    mla: dict | None = None,
    mamba: dict | None = None,
    lossless: bool = False,
    energy: float | None = None,
) -> HybridConfig:
    """`energy` set: latent ranks are chosen per layer later (from the teacher's spectrum), so the fixed
    kv_lora_rank is not checked here."""
    layers = parse_mla_layers(mla_layers, spec.num_layers)
    mla = dict(mla or {})
    mla.pop("lossless", None)
    if lossless:
        mla = {**mla, **lossless_mla(spec)}
    mla.setdefault("qkv_bias", spec.qkv_bias)
    mla.setdefault("o_bias", spec.o_bias)
    mla.setdefault("qk_norm", spec.qk_norm)
    mla_cfg = config_from_dict(MLAConfig, mla)
    if layers:
        check_mla_fits(spec, mla_cfg, check_rank=energy is None)
    mamba = dict(mamba or {})
    mamba.setdefault("headdim", spec.head_dim)  # the mapping from attention needs the teacher's head size
    mamba.setdefault("d_state", spec.head_dim)
    mamba.setdefault("in_proj_bias", spec.qkv_bias)
    mamba.setdefault("out_proj_bias", spec.o_bias)
    mamba_cfg = config_from_dict(MambaConfig, mamba)
    if len(layers) < spec.num_layers:
        check_mamba_fits(spec, mamba_cfg)
    return HybridConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        hidden_act=spec.hidden_act,
        mlp_bias=spec.mlp_bias,
        rms_norm_eps=spec.rms_norm_eps,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters=spec.rope_parameters,
        mixer_types=["mla" if i in layers else "mamba" for i in range(spec.num_layers)],
        mla=asdict(mla_cfg),
        mamba=asdict(mamba_cfg),
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=spec.bos_token_id,
        eos_token_id=spec.eos_token_id,
        pad_token_id=spec.pad_token_id,
    )


def check_mla_fits(spec: TeacherSpec, mla: MLAConfig, check_rank: bool = True) -> None:
    mla.validate(spec.num_heads, spec.num_kv_heads, spec.head_dim)
    hd = spec.head_dim
    if mla.qk_nope_head_dim + mla.qk_rope_head_dim != hd:
        raise ValueError(
            f"student.mla.qk_nope_head_dim + qk_rope_head_dim = {mla.qk_nope_head_dim} + {mla.qk_rope_head_dim} "
            f"must equal the teacher head_dim {hd}: SVD init splits each teacher key head into nope and RoPE parts"
        )
    if mla.v_head_dim != hd:
        raise ValueError(f"student.mla.v_head_dim={mla.v_head_dim} must equal the teacher head_dim {hd}")
    limit = max_kv_rank(spec, mla)
    ranks = [r for r in (mla.kv_lora_ranks or []) if r] or [mla.kv_lora_rank]
    if check_rank and max(ranks) > limit:
        raise ValueError(
            f"student.mla.kv_lora_rank={max(ranks)} exceeds the rank of the teacher's joint K/V map: allowed 1..{limit}"
        )
    q_limit = min(spec.hidden_size, spec.num_heads * hd)
    if mla.q_lora_rank is not None and mla.q_lora_rank > q_limit:
        raise ValueError(
            f"student.mla.q_lora_rank={mla.q_lora_rank} exceeds the teacher's W_q rank: allowed 1..{q_limit}"
        )


def check_mamba_fits(spec: TeacherSpec, mamba: MambaConfig) -> None:
    """The attention -> Mamba2 mapping needs the GQA layout with the teacher's head sizes."""
    mamba.validate(spec.num_heads, spec.num_kv_heads)
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
