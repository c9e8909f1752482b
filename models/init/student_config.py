"""The student's HybridConfig from a teacher and the user's `student.*` settings, checked against the teacher.

Everything that cannot fit the teacher fails here, with the key, the value and what is allowed, before
any weight is touched. The layer map comes as `mixer_types` (a kind name per layer) or `mla_layers` (the layers
of the placed kind, models/mixers.py); each kind completes and checks its own settings (models/mixer_*.py).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ..config import HybridConfig
from ..mixer_kind import InitOptions
from ..mixers import MIXERS, check_mixer_types, mixer_map
from ..teacher_spec import TeacherSpec


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


def student_mixer_types(num_layers: int, mla_layers: Any = None, mixer_types: Any = None) -> list[str]:
    """The per-layer kind names from exactly one of `mixer_types` and `mla_layers` (neither: every layer placed)."""
    if mixer_types is None:
        return mixer_map(num_layers, parse_mla_layers("all" if mla_layers is None else mla_layers, num_layers))
    if mla_layers is not None:
        raise ValueError(f"mixer_types and mla_layers={mla_layers!r} both give the layer map: pass one")
    return check_mixer_types(mixer_types, num_layers)


def build_student_config(
    spec: TeacherSpec,
    mla_layers: Any = None,
    lossless: bool = InitOptions.lossless,
    energy: float | None = InitOptions.energy,
    mixer_types: list[str] | None = None,
    **mixer_args: dict | None,
) -> HybridConfig:
    """`mixer_args`: per kind name, the user's settings of that kind (`mla=dict(kv_lora_rank=64)`,
    `mamba=dict(chunk_size=128)`), completed from the teacher; kinds the map uses are checked to fit it.
    `energy` set: latent ranks are chosen per layer later (from the teacher's spectrum), so the fixed
    kv_lora_rank is not checked here."""
    kinds = student_mixer_types(spec.num_layers, mla_layers, mixer_types)
    unknown = sorted(set(mixer_args) - set(MIXERS))
    if unknown:
        raise ValueError(f"settings for unknown mixer kinds {unknown}; allowed: {list(MIXERS)}")
    options = InitOptions(lossless=lossless, energy=energy)
    settings = {}
    for name, kind in MIXERS.items():
        settings[name] = kind.student_settings(spec, dict(mixer_args.get(name) or {}), options)
        if name in kinds:
            kind.check_fits(spec, settings[name], options)
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
        mixer_types=kinds,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=spec.bos_token_id,
        eos_token_id=spec.eos_token_id,
        pad_token_id=spec.pad_token_id,
        **{name: asdict(s) for name, s in settings.items()},
    )
