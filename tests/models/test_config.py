"""HybridConfig validation: bad values fail at construction with the key, the value and what is allowed."""

import pytest

from models import HybridConfig

from .tiny import tiny_config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mixers=("mla", "attention")), r"mixer_types contains \['attention'\]; allowed"),
        (dict(mla=dict(qk_rope_head_dim=7)), r"mla.qk_rope_head_dim=7 is invalid: must be an even number"),
        (
            dict(mla=dict(qk_rope_head_dim=32)),
            r"mla.qk_rope_head_dim=32 is invalid: must be <= the teacher head_dim 16",
        ),
        (
            dict(mla=dict(rope_heads="two")),
            r"mla.rope_heads='two' is invalid: one of 'shared', 'per_kv_head'",
        ),
        (
            dict(mla=dict(rope_freq_indices=[0, 9, 1, 2])),
            r"mla.rope_freq_indices=.* need 4 indices in \[0, 8\)",
        ),
        (dict(mamba=dict(layout="mamba1")), r"mamba.layout='mamba1' is invalid"),
        (
            dict(mamba=dict(layout="standard", ngroups=3)),
            r"mamba.ngroups=3 is invalid: must divide num_heads=4",
        ),
        (dict(mamba=dict(dt_limit=(0.5, 0.1))), r"mamba.dt_limit=\(0.5, 0.1\) is invalid"),
        (dict(mla=dict(kv_rank=3)), r"unknown MLAConfig keys \['kv_rank'\]"),
    ],
)
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_round_trip_through_json(tmp_path):
    config = tiny_config(mla=dict(rope_freq_indices=[0, 2, 4, 6]), mamba=dict(dt_limit=(0.0, 0.5)))
    config.save_pretrained(tmp_path)
    loaded = HybridConfig.from_pretrained(tmp_path)
    assert loaded.mixer_types == config.mixer_types
    assert loaded.mixer_settings("mla") == config.mixer_settings("mla")
    assert loaded.mixer_settings("mamba") == config.mixer_settings("mamba")
