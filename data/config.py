"""Typed data configuration: a plain dataclass tree (Hydra's `data` group) with `validate()`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

FORMATS = ("json", "jsonl", "parquet", "text", "arrow", "hub")
LONG_SAMPLE_POLICIES = ("split", "drop", "truncate")
MIXTURE_UNITS = ("tokens", "documents")
MIXTURE_STOPS = ("first_exhausted", "all_exhausted")
TEXT_SAMPLE_BY = ("line", "paragraph", "document")


def _fail(key: str, value: object, allowed: str) -> None:
    raise ValueError(f"data config: {key}={value!r} is invalid; allowed: {allowed}")


@dataclass
class SourceConfig:
    """One dataset in the mixture: a Hub dataset or local files, and which column holds the text."""

    # Hub dataset id, or a local file / directory / glob (json, jsonl, parquet, txt, arrow; .gz allowed).
    name_or_path: str = ""
    config_name: str | None = None  # Hub dataset config ("subset"), e.g. "wikitext-2-raw-v1"
    split: str = "train"  # Hub split, slicing allowed ("train[:10%]"); local files are split "train"
    # None: inferred from the file extension (".jsonl" -> json, ".txt" -> text, ...); a non-local
    # name means "hub". Set it for directories of mixed files or unusual extensions.
    format: str | None = None
    revision: str | None = None  # Hub revision (commit, tag or branch)
    # Exactly one of these names the content column. Both None: "text" if present, else "messages".
    text_column: str | None = None  # plain text: loss on every token
    messages_column: str | None = None  # chat: list of {"role", "content"}, rendered by the chat template
    weight: float = 1.0  # relative share of the mixture (see DataConfig.mixture_unit); normalized
    sample_by: str = "line"  # text files only: one sample per "line", "paragraph" or whole "document"
    max_samples: int | None = None  # use only the first N rows (debugging, small runs)

    def validate(self, key: str = "source") -> None:
        if not self.name_or_path:
            _fail(f"{key}.name_or_path", self.name_or_path, "a Hub dataset id or a local path")
        if self.format is not None and self.format not in FORMATS:
            _fail(f"{key}.format", self.format, f"None (infer) or one of {FORMATS}")
        if self.text_column is not None and self.messages_column is not None:
            _fail(
                f"{key}.messages_column",
                self.messages_column,
                "None when text_column is set (one content column)",
            )
        if not (self.weight > 0 and math.isfinite(self.weight)):
            _fail(f"{key}.weight", self.weight, "a finite number > 0")
        if self.sample_by not in TEXT_SAMPLE_BY:
            _fail(f"{key}.sample_by", self.sample_by, f"one of {TEXT_SAMPLE_BY}")
        if self.max_samples is not None and self.max_samples < 1:
            _fail(f"{key}.max_samples", self.max_samples, "None or an integer >= 1")


@dataclass
class DataConfig:
    """Where the tokens come from, how they are split, packed and ordered."""

    sources: list[SourceConfig] = field(default_factory=list)  # empty: the embedded tiny corpus
    tokenizer: str | None = None  # tokenizer dir or Hub id; None: the teacher's (the pipeline passes it)
    seq_len: int = 512  # tokens per packed row
    seed: int = 1234  # drives the split, the mixture, the packing order and the sample order
    micro_batch_size: int = 8  # rows per rank per step
    eval_micro_batch_size: int | None = None  # None: micro_batch_size
    num_workers: int = 2  # DataLoader worker processes (0: load in the main process)
    pin_memory: bool | None = None  # None: pin when CUDA is available
    ild_fraction: float = 0.2  # share of training documents for layer alignment; the rest go to KD
    eval_fraction: float = 0.01  # share of each source's documents held out for evaluation
    eval_max_rows: int | None = None  # cap on packed eval rows (taken in a fixed order); None: all
    mixture_unit: str = "tokens"  # weights are shares of "tokens" or of "documents"
    # "first_exhausted": no document repeats, the source that runs out first sets the size;
    # "all_exhausted": every document is used at least once, smaller shares are repeated.
    mixture_stop: str = "first_exhausted"
    # Documents longer than seq_len: "split" into seq_len pieces (each its own document, pieces
    # shorter than min_doc_tokens dropped), "drop" them, or "truncate" to their first seq_len tokens.
    long_sample: str = "split"
    min_doc_tokens: int = 2  # shorter documents (and split tails) are dropped: nothing to predict
    mask_prompt: bool = True  # chat data: loss only on assistant turns (and their end-of-turn tokens)
    add_bos: bool = True  # plain text: prepend the tokenizer's BOS (if it has one)
    add_eos: bool = True  # plain text: append the tokenizer's EOS, so the model learns to stop
    pack_window: int = 8192  # documents bin-packed together (best fit decreasing) per window
    cache_dir: str | None = None  # datasets cache (Hub downloads, tokenized and packed arrow); None: HF default
    num_proc: int | None = None  # tokenization processes; None: up to the CPU count for large sources
    # Rows whose content column is missing or null, as a share of a source's rows, above which the run stops
    # (naming the source, the count and the first such row); below it they are dropped and counted in the log.
    max_bad_fraction: float = 0.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        """Build from a plain mapping (e.g. an untyped Hydra DictConfig); unknown keys are errors."""
        known = {f.name for f in fields(cls)}
        source_keys = {f.name for f in fields(SourceConfig)}
        for key in d:
            if key not in known:
                _fail(key, d[key], f"known keys {sorted(known)}")
        sources = []
        for i, s in enumerate(d.get("sources") or []):
            if not isinstance(s, SourceConfig):
                for key in s:
                    if key not in source_keys:
                        _fail(f"sources[{i}].{key}", s[key], f"known keys {sorted(source_keys)}")
                s = SourceConfig(**{k: s[k] for k in s})
            sources.append(s)
        return cls(**{**{k: d[k] for k in d}, "sources": sources}).validate()

    def validate(self) -> DataConfig:
        """Raise ValueError naming the key, the bad value and what is allowed; return self."""
        for i, src in enumerate(self.sources):
            if isinstance(src, dict):  # a plain dict from an untyped config
                src = self.sources[i] = SourceConfig(**src)
            src.validate(f"sources[{i}]")
        ints = {"seq_len": 2, "micro_batch_size": 1, "num_workers": 0, "min_doc_tokens": 1, "pack_window": 1}
        for key, low in ints.items():
            value = getattr(self, key)
            if not isinstance(value, int) or value < low:
                _fail(key, value, f"an integer >= {low}")
        for key in ("eval_micro_batch_size", "eval_max_rows", "num_proc"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                _fail(key, value, "None or an integer >= 1")
        if not 0.0 <= self.ild_fraction <= 1.0:
            _fail("ild_fraction", self.ild_fraction, "a number in [0, 1]")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            _fail("max_bad_fraction", self.max_bad_fraction, "a number in [0, 1]")
        if not 0.0 <= self.eval_fraction < 1.0:
            _fail("eval_fraction", self.eval_fraction, "a number in [0, 1)")
        if self.min_doc_tokens > self.seq_len:
            _fail("min_doc_tokens", self.min_doc_tokens, f"at most seq_len ({self.seq_len})")
        for key, allowed in (
            ("mixture_unit", MIXTURE_UNITS),
            ("mixture_stop", MIXTURE_STOPS),
            ("long_sample", LONG_SAMPLE_POLICIES),
        ):
            if getattr(self, key) not in allowed:
                _fail(key, getattr(self, key), f"one of {allowed}")
        return self
