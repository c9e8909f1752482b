"""DataConfig: defaults validate, bad values name the key, Hydra/OmegaConf can hold it."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from data.config import DataConfig, SourceConfig


def test_defaults_validate():
    cfg = DataConfig().validate()
    assert cfg.ild_fraction == 0.2 and cfg.long_sample == "split" and cfg.mask_prompt


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"seq_len": 1}, "seq_len=1"),
        ({"ild_fraction": 1.5}, "ild_fraction=1.5"),
        ({"eval_fraction": 1.0}, "eval_fraction=1.0"),
        ({"long_sample": "wrap"}, "long_sample='wrap'"),
        ({"mixture_unit": "bytes"}, "mixture_unit='bytes'"),
        ({"micro_batch_size": 0}, "micro_batch_size=0"),
        ({"sources": [SourceConfig("a.jsonl", weight=0)]}, "sources[0].weight=0"),
        ({"sources": [SourceConfig("a.jsonl", format="csv")]}, "sources[0].format='csv'"),
        (
            {"sources": [SourceConfig("a.jsonl", text_column="t", messages_column="m")]},
            "sources[0].messages_column",
        ),
    ],
)
def test_bad_values_name_key_and_allowed(overrides, key):
    with pytest.raises(ValueError, match="allowed") as err:
        DataConfig(**overrides).validate()
    assert key in str(err.value)


def test_structured_config_round_trip():
    base = OmegaConf.structured(DataConfig)
    over = OmegaConf.from_dotlist(["seq_len=64", "sources=[{name_or_path: a.jsonl, weight: 3}]"])
    cfg = OmegaConf.to_object(OmegaConf.merge(base, over))
    assert isinstance(cfg, DataConfig) and isinstance(cfg.sources[0], SourceConfig)
    assert cfg.seq_len == 64 and cfg.sources[0].weight == 3.0
    cfg.validate()


def test_dict_sources_are_converted():
    cfg = DataConfig(sources=[{"name_or_path": "a.jsonl", "weight": 2.0}]).validate()
    assert cfg.sources[0] == SourceConfig("a.jsonl", weight=2.0)


def test_from_untyped_mapping():
    untyped = OmegaConf.create({"seq_len": 64, "sources": [{"name_or_path": "a.jsonl", "weight": 2}]})
    cfg = DataConfig.from_dict(untyped)
    assert cfg.seq_len == 64 and cfg.sources == [SourceConfig("a.jsonl", weight=2)]
    with pytest.raises(ValueError, match=r"seq_lenn=64 is invalid; allowed: known keys"):
        DataConfig.from_dict({"seq_lenn": 64})
    with pytest.raises(ValueError, match=r"sources\[0\].path='a' is invalid"):
        DataConfig.from_dict({"sources": [{"path": "a"}]})
