"""The mixer registry: every kind complete, layers built from it, clear errors, and no kind switch outside it."""

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from models import HybridCache, HybridForCausalLM, student_cache_bytes
from models.flops import mixer_extra_flops
from models.init import build_student_config, convert_teacher
from models.mixer_kind import MixerKind
from models.mixers import (
    FILL_KIND,
    MIXERS,
    PLACED_KIND,
    candidate_kinds,
    check_mixer_types,
    kind_of_module,
    mixer_kind,
    mixer_map,
)
from models.select import sensitivity_from_ild
from models.teachers import describe_teacher

from .tiny import tiny_config

REPO = Path(__file__).resolve().parents[2]
OPTIONAL_FIELDS = {"init_weights", "calibration"}  # None: nothing beyond the generic init / nothing to fit
CALLABLE_FIELDS = {
    "validate",
    "call",
    "make_cache",
    "cache_bytes",
    "extra_flops",
    "student_settings",
    "check_fits",
    "plan_init",
    "init_from_attention",
}


@pytest.mark.parametrize("name", list(MIXERS))
def test_every_kind_provides_every_field(name):
    kind = MIXERS[name]
    assert kind.name == name
    for field in dataclasses.fields(MixerKind):
        value = getattr(kind, field.name)
        assert value is not None or field.name in OPTIONAL_FIELDS, f"{name} has no {field.name}"
        if field.name in CALLABLE_FIELDS or (field.name in OPTIONAL_FIELDS and value is not None):
            assert callable(value), f"{name}.{field.name} is not callable"
    assert issubclass(kind.module, nn.Module)
    assert dataclasses.is_dataclass(kind.settings) and kind.settings() is not None  # defaults for every setting
    assert kind.attribute.isidentifier()
    assert {PLACED_KIND.name, FILL_KIND.name} <= set(candidate_kinds()) <= set(MIXERS)


def test_kinds_keep_distinct_attributes_and_modules():
    kinds = list(MIXERS.values())
    assert len({k.attribute for k in kinds}) == len(kinds)  # state-dict keys tell the kinds apart
    assert len({k.module for k in kinds}) == len(kinds)
    assert PLACED_KIND is not FILL_KIND


@pytest.mark.parametrize("name", list(MIXERS))
def test_decoder_layer_is_built_from_the_kind(name):
    kind = mixer_kind(name)
    model = HybridForCausalLM(tiny_config(mixers=(name, name))).eval()
    for i, layer in enumerate(model.model.layers):
        assert layer.kind is kind and layer.layer_type == name
        assert isinstance(layer.mixer, kind.module) and getattr(layer, kind.attribute) is layer.mixer
        assert kind_of_module(layer.mixer) is kind
        assert any(key.startswith(f"model.layers.{i}.{kind.attribute}.") for key in model.state_dict())
        others = [k.attribute for k in MIXERS.values() if k is not kind]
        assert not any(hasattr(layer, attribute) for attribute in others)
        assert mixer_extra_flops(layer.mixer, 8.0) > 0
    ids = torch.randint(0, 97, (2, 6))
    cache = HybridCache(model.config, 2, dtype=torch.float32, max_length=10)
    with torch.no_grad():
        logits = model(ids, cache=cache).logits
    assert logits.shape == (2, 6, 97) and torch.isfinite(logits).all()
    assert cache.is_linear == [kind.constant_state] * 2
    expected = student_cache_bytes(model.config, torch.float32, torch.float32).total(10, batch=2)
    assert cache.nbytes() == expected  # the kind's cache_bytes is what its make_cache allocates


def test_unknown_kinds_are_named_with_the_allowed_ones():
    allowed = str(list(MIXERS)).replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ValueError, match=rf"mixer kind 'lstm' is unknown; allowed: {allowed}"):
        mixer_kind("lstm")
    with pytest.raises(ValueError, match=rf"mixer_types contains \['lstm'\]; allowed: {allowed}"):
        tiny_config(mixers=(PLACED_KIND.name, "lstm"))
    with pytest.raises(ValueError, match=rf"student.layers contains \[3, 'attn'\]; allowed: {allowed}"):
        check_mixer_types([PLACED_KIND.name, 3, "attn"], 3, key="student.layers")
    with pytest.raises(ValueError, match="student.layers has 1 entries, num_hidden_layers=2"):
        check_mixer_types([PLACED_KIND.name], 2, key="student.layers")
    with pytest.raises(ValueError, match="student.layers='.*' is invalid: a list of one mixer kind per layer"):
        check_mixer_types(PLACED_KIND.name, 2, key="student.layers")


def _teacher_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        architectures=["LlamaForCausalLM"],
    )


def _spec():
    return describe_teacher(_teacher_config())


def test_student_config_takes_a_per_layer_kind_list():
    spec = _spec()
    mla = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16)
    kinds = [FILL_KIND.name, PLACED_KIND.name, FILL_KIND.name]
    config = build_student_config(spec, mixer_types=kinds, **{PLACED_KIND.name: mla})
    assert config.mixer_types == kinds and config.mla_layers == [1]
    assert config.mixer_settings(PLACED_KIND.name).kv_lora_rank == 16
    assert build_student_config(spec, mla_layers=[1], mla=mla).to_dict() == config.to_dict()
    assert mixer_map(3, [1]) == kinds
    with pytest.raises(ValueError, match="mixer_types and mla_layers=.* both give the layer map"):
        build_student_config(spec, mla_layers=[1], mixer_types=kinds)
    with pytest.raises(ValueError, match=r"mixer_types contains \['gru'\]"):
        build_student_config(spec, mixer_types=[FILL_KIND.name, "gru", FILL_KIND.name])
    with pytest.raises(ValueError, match=r"settings for unknown mixer kinds \['gru'\]"):
        build_student_config(spec, gru=dict(hidden=3))


def test_convert_teacher_follows_mixer_types():
    torch.manual_seed(0)
    spec = _spec()
    teacher = AutoModelForCausalLM.from_config(_teacher_config()).eval()
    mla = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16)
    kinds = [PLACED_KIND.name, FILL_KIND.name, PLACED_KIND.name]
    student, report = convert_teacher(teacher, spec, mixer_types=kinds, mla=mla)
    assert student.config.mixer_types == kinds == [row["mixer"] for row in report.layers]
    assert set(report.mixer_settings) == set(kinds)
    for row, layer in zip(report.layers, student.model.layers, strict=True):
        assert ("attn_out_rel_err" in row) == layer.kind.reproduces_attention


def test_sensitivity_uses_the_best_other_kind(monkeypatch):
    """log(L_best other / L_placed) over whichever kinds were measured; a third kind needs no code change."""
    third = dataclasses.replace(FILL_KIND, name="third")
    monkeypatch.setitem(MIXERS, "third", third)
    losses = {
        "0": {PLACED_KIND.name: 0.1, FILL_KIND.name: 0.4, "third": 0.2},
        "1": {PLACED_KIND.name: 0.2, "third": 0.4},
    }
    scores = sensitivity_from_ild(losses, 2)
    assert scores == pytest.approx([math.log(0.2 / 0.1), math.log(0.4 / 0.2)])
    with pytest.raises(ValueError, match=r"layer 0 has ILD losses of \['assigned'\].*candidates=both"):
        sensitivity_from_ild({"0": {"assigned": 0.1}}, 1)


# ----------------------------------------------------------------------------------- no kind switch elsewhere


def _kind_literals(path: Path) -> list[str]:
    """`file:line` of every quoted kind name ("mla", 'mamba', ...), code, comment or docstring alike."""
    quoted = re.compile("|".join(rf"[\"']{re.escape(name)}[\"']" for name in MIXERS))
    lines = path.read_text().splitlines()
    return [f"{path.relative_to(REPO)}:{n}: {line.strip()}" for n, line in enumerate(lines, 1) if quoted.search(line)]


def test_no_kind_names_outside_the_mixer_files():
    """A kind is one file and one registry entry: models/ (but its mixer files), data/ and train/ ask the registry."""

    def is_mixer_file(path: Path) -> bool:  # models/mixer_<kind>.py, models/mixer_kind.py, models/mixers.py
        return path.parent == REPO / "models" and path.name.startswith("mixer")

    files = [
        path
        for folder in ("models", "data", "train")
        for path in sorted((REPO / folder).rglob("*.py"))
        if not is_mixer_file(path)
    ]
    assert len(files) > 20
    found = [hit for path in files for hit in _kind_literals(path)]
    assert not found, "kind names outside the mixer files (ask models.mixers instead):\n" + "\n".join(found)
