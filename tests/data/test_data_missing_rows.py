"""Rows whose content is missing or null are counted per source: above data.max_bad_fraction the run stops with one
line (count, share, first row); at or below it they are dropped and logged, never trained on silently."""

from __future__ import annotations

import pytest

from data.config import DataConfig, SourceConfig
from data.sources import DataSourceError, check_missing_rows, load_source, missing_rows


def _jsonl(path, rows: list[str]) -> SourceConfig:
    path.write_text("".join(row + "\n" for row in rows))
    return SourceConfig(name_or_path=str(path))


def test_missing_and_null_rows_are_counted_with_the_first_one(tmp_path):
    src = load_source(
        _jsonl(tmp_path / "a.jsonl", ['{"text": "a"}', '{"body": "b"}', '{"text": null}', '{"text": "d"}'])
    )
    assert missing_rows(src.dataset) == (2, 1)
    with pytest.raises(DataSourceError, match=r"2 of 4 rows \(50.0 %\) have no 'text'.*first at row 1"):
        check_missing_rows(src, 0.0)
    assert check_missing_rows(src, 0.5) == 2  # allowed: dropped and counted


def test_a_clean_source_passes_at_the_strict_default(tmp_path):
    src = load_source(_jsonl(tmp_path / "b.jsonl", ['{"text": "a"}', '{"text": ""}']))  # blank is not missing
    assert missing_rows(src.dataset) == (0, None) and check_missing_rows(src, DataConfig().max_bad_fraction) == 0


def test_max_bad_fraction_is_checked():
    with pytest.raises(ValueError, match="max_bad_fraction=1.5"):
        DataConfig(max_bad_fraction=1.5).validate()
