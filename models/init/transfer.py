"""Convert a teacher into an initialized hybrid student: the trunk copied, each mixer initialized.

    student, report = convert_teacher(teacher, spec, mla_layers=[0, 5, 10, 14], mla=dict(kv_lora_rank=128, ...))

Order of work: every check (config fit, ranks, layer indices) happens in build_student_config before any
weight is read; then each mixer kind plans from the teacher's weights of its layers (MLA: the RoPE pairs and,
with an energy threshold, the per-layer ranks); then the student is built and each layer's kind fills its mixer
(models/mixer_*.py), and the trunk is loaded into strictly by name.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from ..documents import documents_from_positions
from ..flops import student_cache_bytes, teacher_cache_bytes
from ..hybrid import HybridForCausalLM
from ..mixer_kind import InitOptions
from ..mixers import MIXERS
from ..teacher_spec import TeacherSpec
from ..teachers import adapter_for, sdpa_attention
from .report import InitReport
from .student_config import build_student_config

TRUNK_PREFIXES = ("model.embed_tokens.", "model.norm.", "lm_head.")
LAYER_TRUNK = ("input_layernorm.", "post_attention_layernorm.", "mlp.")


MIXER_INITS = ("attention", "random")


@torch.no_grad()
def convert_teacher(
    teacher: PreTrainedModel,
    spec: TeacherSpec,
    mla_layers: Any = None,
    lossless: bool = InitOptions.lossless,
    energy: float | None = InitOptions.energy,
    rope_pairs: str = InitOptions.rope_pairs,
    conv_init: str = InitOptions.conv_init,
    mixer_init: str = "attention",
    mixer_types: list[str] | None = None,
    **mixer_args: dict | None,
) -> tuple[HybridForCausalLM, InitReport]:
    """Build and initialize the student. The map is `mixer_types` (a kind name per layer) or `mla_layers`
    (default: all); `mixer_args` are per-kind settings by kind name (`mla=dict(...)`, `mamba=dict(...)`).
    `energy` picks per-layer latent ranks (fraction of squared singular values kept, rounded up to a multiple
    of 8); `rope_pairs` picks which teacher frequencies stay RoPE. `mixer_init="random"` leaves the mixers as
    the model's initializer made them (the baseline that shows what initialization from attention buys);
    embeddings, norms and MLPs are copied either way."""
    if mixer_init not in MIXER_INITS:
        raise ValueError(f"student.mixer_init={mixer_init!r} is invalid: one of {list(MIXER_INITS)}")
    options = InitOptions(lossless=lossless, energy=energy, rope_pairs=rope_pairs, conv_init=conv_init)
    # Every check happens here, before any weight is read.
    config = build_student_config(spec, mla_layers, lossless, energy, mixer_types, **mixer_args)
    weights = adapter_for(teacher).attention_weights(teacher)
    planned: dict[int, Any] = {}
    for name, kind in MIXERS.items():  # choices from the teacher's weights; may update the kind's settings
        layers = {i: weights[i] for i, t in enumerate(config.mixer_types) if t == name}
        if layers:
            planned.update(kind.plan_init(config, spec, layers, options))

    student = HybridForCausalLM(config).to(next(teacher.parameters()).dtype).eval()
    _copy_trunk(teacher, student)
    rows = []
    with sdpa_attention(teacher):  # the probes are one document each: a FlexAttention teacher would only compile
        for i, layer in enumerate(student.model.layers):
            if mixer_init == "random":
                rows.append({"layer": i, "mixer": layer.layer_type, "init": "random"})
                continue
            errors = layer.kind.init_from_attention(layer.mixer, weights[i], config, planned.get(i), options)
            if layer.kind.reproduces_attention:
                errors["attn_out_rel_err"] = attention_output_error(teacher, student, i)
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
        mixer_settings={name: getattr(config, name) for name in MIXERS if name in config.mixer_types},
        layers=rows,
    )
    return student, report


def attention_output_error(teacher: PreTrainedModel, student: HybridForCausalLM, layer: int) -> float:
    """Relative error of the layer's mixer output (a kind that reproduces attention, e.g. MLA) against the teacher
    attention's on a random probe at positions spread over 0..~2000, so RoPE handling (and not only the weights)
    is measured."""
    generator = torch.Generator().manual_seed(layer)
    dtype = next(teacher.parameters()).dtype
    hidden = torch.randn(1, 64, teacher.config.hidden_size, generator=generator).to(dtype)
    positions = torch.arange(64)[None] * 31
    expected = adapter_for(teacher).attention_forward(teacher, layer, hidden, positions)
    s_cos, s_sin = student.model.rope(positions)
    docs = documents_from_positions(torch.arange(64)[None])  # one document, causal over the probe
    mixing = student.model.layers[layer]
    got = mixing.kind.call(mixing.mixer, hidden, s_cos, s_sin, docs, None)
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def _copy_trunk(teacher: PreTrainedModel, student: HybridForCausalLM) -> None:
    """Embeddings, norms, MLPs and lm_head by name; every one of them must exist with the same shape."""
    source = adapter_for(teacher).trunk_state_dict(teacher)
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
