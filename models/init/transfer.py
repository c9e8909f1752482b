"""Convert a teacher into an initialized hybrid student: the trunk copied, each mixer initialized.

    student, report = convert_teacher(teacher, spec, mla_layers=[0, 5, 10, 14], mla=dict(kv_lora_rank=128, ...))

Order of work: every check (config fit, ranks, layer indices) happens in build_student_config before any
weight is read; then the RoPE pairs and (with an energy threshold) the per-layer ranks are chosen from
the teacher's weights; then the student is built and filled, and loaded into strictly by name.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from transformers import PreTrainedModel

from ..attention_weights import attention_weights
from ..documents import documents_from_positions
from ..flops import student_cache_bytes, teacher_cache_bytes
from ..hybrid import HybridForCausalLM
from ..mixer_mamba2 import init_mamba_from_attention
from ..mixer_mla import choose_rope_pairs, energy_rank, init_mla_from_attention, kv_factors, rope_split
from ..teacher import TeacherSpec
from .report import InitReport
from .student_config import build_student_config, check_mla_fits

TRUNK_PREFIXES = ("model.embed_tokens.", "model.norm.", "lm_head.")
LAYER_TRUNK = ("input_layernorm.", "post_attention_layernorm.", "mlp.")


MIXER_INITS = ("attention", "random")


@torch.no_grad()
def convert_teacher(
    teacher: PreTrainedModel,
    spec: TeacherSpec,
    mla_layers: Any = "all",
    mla: dict | None = None,
    mamba: dict | None = None,
    lossless: bool = False,
    energy: float | None = None,
    rope_pairs: str = "energy",
    conv_init: str = "identity",
    mixer_init: str = "attention",
) -> tuple[HybridForCausalLM, InitReport]:
    """Build and initialize the student. `energy` picks per-layer latent ranks (fraction of squared singular
    values kept, rounded up to a multiple of 8); `rope_pairs` picks which teacher frequencies stay RoPE.
    `mixer_init="random"` leaves the mixers as the model's initializer made them (the baseline that shows what
    initialization from attention buys); embeddings, norms and MLPs are copied either way."""
    if mixer_init not in MIXER_INITS:
        raise ValueError(f"student.mixer_init={mixer_init!r} is invalid: one of {list(MIXER_INITS)}")
    mla = dict(mla or {})
    config = build_student_config(spec, mla_layers, mla, mamba, lossless, energy)  # checks before reading weights
    weights = [
        attention_weights(layer.self_attn, spec.num_heads, spec.num_kv_heads, spec.head_dim)
        for layer in teacher.model.layers
    ]
    mla_cfg = config.mla_config
    factors: dict[int, Any] = {}
    if config.mla_layers and not lossless:
        chosen = choose_rope_pairs(
            [weights[i] for i in config.mla_layers], spec.head_dim, mla_cfg.qk_rope_head_dim, rope_pairs
        )
        mla_cfg.rope_freq_indices = chosen
        _, nope_dims = rope_split(spec.head_dim, chosen)
        factors = {i: kv_factors(weights[i], nope_dims) for i in config.mla_layers}
        if energy is not None:
            ranks = [0] * spec.num_layers
            for i in config.mla_layers:
                ranks[i] = energy_rank(factors[i].s, energy)
            mla_cfg.kv_lora_ranks = ranks
        check_mla_fits(spec, mla_cfg)
        config.mla = asdict(mla_cfg)
        config.validate_hybrid()

    student = HybridForCausalLM(config).to(next(teacher.parameters()).dtype).eval()
    _copy_trunk(teacher, student)
    rows = []
    for i, layer in enumerate(student.model.layers):
        if mixer_init == "random":
            rows.append({"layer": i, "mixer": layer.layer_type, "init": "random"})
            continue
        if layer.layer_type == "mla":
            errors = init_mla_from_attention(layer.self_attn, weights[i], config.mla_config, factors.get(i))
            errors["attn_out_rel_err"] = attention_output_error(teacher, student, i)
        else:
            errors = init_mamba_from_attention(layer.mamba, weights[i], conv_init)
        rows.append({"layer": i, "mixer": layer.layer_type, **errors})
    if config.tie_word_embeddings:
        student.tie_weights()
    teacher_bytes = teacher_cache_bytes(spec.num_layers, spec.num_kv_heads, spec.head_dim)
    student_bytes = student_cache_bytes(config)
    report = InitReport(
        teacher_family=spec.family,
        teacher_params=sum(p.numel() for p in teacher.parameters()),
        student_params=sum(p.numel() for p in student.parameters()),
        teacher_kv_bytes_per_token=teacher_bytes.per_token,
        student_kv_bytes_per_token=student_bytes.per_token,
        student_state_bytes=student_bytes.constant,
        rope_freq_indices=config.mla_config.rope_freq_indices if config.mla_layers else None,
        layers=rows,
    )
    return student, report


def attention_output_error(teacher: PreTrainedModel, student: HybridForCausalLM, layer: int) -> float:
    """Relative error of the MLA layer's output against the teacher attention's on a random probe at
    positions spread over 0..~2000, so RoPE handling (and not only the weights) is measured."""
    generator = torch.Generator().manual_seed(layer)
    dtype = next(teacher.parameters()).dtype
    hidden = torch.randn(1, 64, teacher.config.hidden_size, generator=generator).to(dtype)
    positions = torch.arange(64)[None] * 31
    cos, sin = teacher.model.rotary_emb(hidden, positions)
    expected = teacher.model.layers[layer].self_attn(hidden, position_embeddings=(cos, sin), attention_mask=None)[0]
    s_cos, s_sin = student.model.rope(positions)
    docs = documents_from_positions(torch.arange(64)[None])  # one document, causal over the probe
    got = student.model.layers[layer].self_attn(hidden, s_cos, s_sin, docs)
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def _copy_trunk(teacher: PreTrainedModel, student: HybridForCausalLM) -> None:
    """Embeddings, norms, MLPs and lm_head by name; every one of them must exist with the same shape."""
    source = teacher.state_dict()
    target = student.state_dict()
    names = [
        name
        for name in target
        if name.startswith(TRUNK_PREFIXES)
        or (name.startswith("model.layers.") and name.split(".", 3)[3].startswith(LAYER_TRUNK))
    ]
    for name in names:
        if name not in source:
            if name == "lm_head.weight" and student.config.tie_word_embeddings:
                continue
            raise KeyError(f"teacher has no weight {name!r} to copy into the student")
        if source[name].shape != target[name].shape:
            raise ValueError(
                f"shape mismatch for {name}: teacher {tuple(source[name].shape)}, student {tuple(target[name].shape)}"
            )
        target[name].copy_(source[name])
