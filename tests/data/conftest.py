"""Fixtures for the data tests: the shipped tiny tokenizer, writers for local source files."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from data.corpus import tiny_tokenizer_path

datasets.disable_progress_bars()


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_path()))


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> str:
    """One datasets cache for tests that build the embedded corpus (tokenized once per session)."""
    return str(tmp_path_factory.mktemp("datasets_cache"))


@pytest.fixture
def write_jsonl():
    def write(path: Path, rows: list[dict]) -> str:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    return write
