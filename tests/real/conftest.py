"""The real teacher, SmolLM2-135M-Instruct from its Q4_1 GGUF, materialized once per session (~30 s on 2 cores).

The materialized directory lies under `<zebra_cache>/gguf`, where `$ZEBRA_DISTILL_CACHE=<zebra_cache>` points the
pipeline too (tests/real/test_pipeline_real.py), so no test dequantizes the file twice."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from models.gguf import materialize_gguf_teacher
from models.teachers import load_teacher

# English prose written for these tests (not from any corpus): 80 SmolLM2 tokens.
TEXT = (
    "The water cycle describes how water moves between the oceans, the air and the land. Heat from the sun "
    "evaporates water from lakes and seas; the vapour rises, cools and condenses into clouds. When the droplets "
    "grow heavy enough they fall as rain or snow, which feeds rivers and soaks into the ground, and sooner or "
    "later the water flows back to the sea, where the cycle begins again."
)


@pytest.fixture(scope="session")
def zebra_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zebra_cache")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf_file, zebra_cache) -> Path:
    return materialize_gguf_teacher(smollm2_gguf_file, zebra_cache / "gguf")


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(teacher, spec, tokenizer) in float32."""
    teacher, spec = load_teacher(str(smollm2_dir))
    return teacher, spec, AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def text_ids(smollm2):
    return smollm2[2](TEXT, return_tensors="pt")["input_ids"]
