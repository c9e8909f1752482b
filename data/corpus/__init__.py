"""The embedded corpus of the `tiny` preset: synthetic text (generate.py) and its byte-level BPE tokenizer."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def tiny_corpus_path() -> Path:
    """Plain-text documents, one JSON object {"text": ...} per line, gzipped (about 700k tokens)."""
    return _HERE / "tiny.jsonl.gz"


def tiny_chat_path() -> Path:
    """Chat conversations, one {"messages": [{"role", "content"}, ...]} per line, gzipped."""
    return _HERE / "tiny_chat.jsonl.gz"


def tiny_tokenizer_path() -> Path:
    """A tokenizer dir for `transformers.AutoTokenizer.from_pretrained` (1024 tokens, chat template)."""
    return _HERE / "tokenizer"
