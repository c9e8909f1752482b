"""Tokenize a loaded source once, into cached arrow with an explicit fingerprint.

Output columns per document: `input_ids` (int32 list), `loss_mask` (bool list: is this token a
training target) and `num_tokens`. The fingerprint is computed from the source's own fingerprint,
the tokenizer's content (vocabulary, merges, template, special tokens) and the options below, so
reruns and other ranks hit `datasets`' cache, and any change tokenizes again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from data.chat import check_messages, mask_from_spans, render_chat
from data.config import DataConfig
from data.sources import DataSourceError, LoadedSource, locate_bad_utf8

log = logging.getLogger(__name__)

VERSION = 1  # bump when the tokenized layout or rules change: invalidates cached arrow
FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "loss_mask": datasets.List(datasets.Value("bool")),
        "num_tokens": datasets.Value("int32"),
    }
)
PARALLEL_MIN_ROWS = 50_000  # below this, worker start-up costs more than tokenization saves


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (datasets uses it as the cache file name)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def tokenizer_signature(tokenizer: PreTrainedTokenizerBase) -> str:
    """Identify a tokenizer by what it does, not by where it was loaded from."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return fingerprint(
        type(tokenizer).__name__,
        body,
        tokenizer.chat_template,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )


def _encode_text(
    batch: dict[str, list], indices: list[int], tok: PreTrainedTokenizerBase, cfg: DataConfig, name: str
) -> dict[str, list]:
    texts = []
    for i, t in zip(indices, batch["text"], strict=True):
        if t is not None and not isinstance(t, str):
            raise DataSourceError(f"source {name} row {i}, field 'text': expected a string, got {type(t).__name__}")
        texts.append(t if t and not t.isspace() else "")  # blank rows become empty and are filtered out
    bos = [tok.bos_token_id] if cfg.add_bos and tok.bos_token_id is not None else []
    eos = [tok.eos_token_id] if cfg.add_eos and tok.eos_token_id is not None else []
    ids = [bos + x + eos if x else [] for x in tok(texts, add_special_tokens=False)["input_ids"]]
    return {
        "input_ids": ids,
        "loss_mask": [[True] * len(x) for x in ids],
        "num_tokens": [len(x) for x in ids],
    }


def _encode_chat(
    batch: dict[str, list], indices: list[int], tok: PreTrainedTokenizerBase, cfg: DataConfig, name: str
) -> dict[str, list]:
    texts, spans = [], []
    for i, row in zip(indices, batch["messages"], strict=True):
        where = f"source {name} row {i}, field 'messages'"
        try:
            text, s = render_chat(tok, check_messages(row, where), where)
        except ValueError as e:
            raise DataSourceError(str(e)) from None
        texts.append(text)
        spans.append(s)
    # The template writes BOS itself where the model wants it: no special tokens added here.
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if cfg.mask_prompt:
        masks = [mask_from_spans(o, s) for o, s in zip(enc["offset_mapping"], spans, strict=True)]
    else:
        masks = [[True] * len(x) for x in ids]
    return {"input_ids": ids, "loss_mask": masks, "num_tokens": [len(x) for x in ids]}


def _caused_by(e: BaseException | None, kind: type) -> bool:
    while e is not None:
        if isinstance(e, kind) or kind.__name__ in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def tokenize_source(src: LoadedSource, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> datasets.Dataset:
    """Tokenize (cached) and drop documents too short to train on, or too long under long_sample=drop."""
    ds = src.dataset
    encode = _encode_text if src.kind == "text" else _encode_chat
    fp = fingerprint(
        "tokenize",
        VERSION,
        ds._fingerprint,
        tokenizer_signature(tokenizer),
        src.kind,
        cfg.mask_prompt if src.kind == "chat" else None,
        cfg.add_bos,
        cfg.add_eos,
    )
    num_proc = cfg.num_proc
    if num_proc is None and len(ds) >= PARALLEL_MIN_ROWS:
        num_proc = min(os.cpu_count() or 1, 16)
    try:
        tokenized = ds.map(
            encode,
            batched=True,
            with_indices=True,
            remove_columns=ds.column_names,
            features=FEATURES,
            fn_kwargs={"tok": tokenizer, "cfg": cfg, "name": src.name},
            num_proc=num_proc if num_proc and num_proc > 1 else None,
            new_fingerprint=fp,
            desc=f"tokenize {src.name}",
        )
    except Exception as e:
        # Arrow readers (json, parquet) may store undecodable bytes; they surface only when read here.
        if _caused_by(e, UnicodeDecodeError):
            raise DataSourceError(locate_bad_utf8(src)) from e
        raise

    max_len = cfg.seq_len if cfg.long_sample == "drop" else None

    def keep(n: list[int]) -> list[bool]:
        return [cfg.min_doc_tokens <= x and (max_len is None or x <= max_len) for x in n]

    kept = tokenized.filter(
        keep,
        batched=True,
        input_columns="num_tokens",
        new_fingerprint=fingerprint("filter", fp, cfg.min_doc_tokens, max_len),
    )
    if len(kept) == 0:
        rule = f"min_doc_tokens={cfg.min_doc_tokens}" + (
            f", long_sample=drop with seq_len={max_len}" if max_len else ""
        )
        raise DataSourceError(
            f"source {src.name}: no documents left after filtering ({len(tokenized)} rows, blank rows dropped, {rule})"
        )
    if len(kept) < len(tokenized):
        log.info(
            "source %s: dropped %d of %d documents (blank, shorter than %d tokens%s)",
            src.name,
            len(tokenized) - len(kept),
            len(tokenized),
            cfg.min_doc_tokens,
            f" or longer than {max_len}" if max_len else "",
        )
    return kept
