"""Preference pairs for DPO: (prompt, chosen, rejected) rendered through the tokenizer's chat template.

Sources are local json / jsonl / parquet files or Hub datasets with the columns `prompt` (a string or a
list of chat messages), `chosen` and `rejected` (strings, or message lists whose last turn is the
assistant's). With no source, pairs are made from the embedded chat corpus: the chosen answer is the
conversation's own first reply, the rejected one the first reply of another conversation (a fluent but
wrong answer), so a model that reads the question can tell them apart.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from .batch import IGNORE_INDEX
from .config import SourceConfig
from .corpus import tiny_chat_path

COLUMNS = ("prompt", "chosen", "rejected")


@dataclass
class PreferencePair:
    chosen_ids: list[int]
    chosen_labels: list[int]  # -100 on the prompt
    rejected_ids: list[int]
    rejected_labels: list[int]


def _messages(value, role: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return list(value)


def tiny_preference_rows(seed: int = 0) -> list[dict]:
    with gzip.open(tiny_chat_path(), "rt") as handle:
        chats = [json.loads(line)["messages"] for line in handle]
    rng = random.Random(seed)
    rows = []
    for i, chat in enumerate(chats):
        other = chats[(i + rng.randrange(1, len(chats))) % len(chats)]
        if other[1]["content"] == chat[1]["content"]:
            continue
        rows.append({"prompt": chat[0]["content"], "chosen": chat[1]["content"], "rejected": other[1]["content"]})
    return rows


def load_preference_rows(sources: list[SourceConfig]) -> list[dict]:
    """Rows with prompt/chosen/rejected from every source; a missing column names the source."""
    rows: list[dict] = []
    for src in sources:
        path = Path(src.name_or_path)
        if path.exists():
            kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
            if kind is None:
                raise ValueError(f"dpo source {path}: use .json, .jsonl or .parquet with columns {list(COLUMNS)}")
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        else:
            ds = datasets.load_dataset(src.name_or_path, src.config_name, split=src.split, revision=src.revision)
        missing = [c for c in COLUMNS if c not in ds.column_names]
        if missing:
            raise ValueError(f"dpo source {src.name_or_path}: missing column(s) {missing}; has {ds.column_names}")
        if len(ds) == 0:
            raise ValueError(f"dpo source {src.name_or_path}: no rows")
        rows += [{c: r[c] for c in COLUMNS} for r in ds]
    return rows


def _ids(encoded) -> list[int]:
    """apply_chat_template(tokenize=True) gives a list (older transformers) or a BatchEncoding (5.x)."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def tokenize_pair(row: dict, tokenizer: PreTrainedTokenizerBase, max_len: int) -> PreferencePair | None:
    """Chat-render prompt + answer; labels cover the answer only. None if the pair does not fit max_len."""
    prompt = _messages(row["prompt"], "user")
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    prompt_ids = _ids(prompt_ids)
    out = []
    for key in ("chosen", "rejected"):
        answer = _messages(row[key], "assistant")[-1:]
        ids = tokenizer.apply_chat_template(prompt + answer, tokenize=True)
        ids = _ids(ids)
        if ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError("dpo: the chat template does not render the prompt as a prefix of prompt + answer")
        if len(ids) > max_len:
            return None
        out += [ids, [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :]]
    return PreferencePair(*out)


def collate_pairs(pairs: list[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded to the longest: (2B, T) ids and labels."""
    seqs = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    labels = [p.chosen_labels for p in pairs] + [p.rejected_labels for p in pairs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    lab = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for i, (s, lb) in enumerate(zip(seqs, labels, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(lb)] = torch.tensor(lb)
    return {"input_ids": ids, "labels": lab}


def preference_splits(
    sources: list[SourceConfig], tokenizer: PreTrainedTokenizerBase, max_len: int, seed: int, eval_fraction: float = 0.1
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    rows = load_preference_rows(sources) if sources else tiny_preference_rows(seed)
    pairs = [p for p in (tokenize_pair(r, tokenizer, max_len) for r in rows) if p is not None]
    if len(pairs) < 2:
        raise ValueError(f"dpo: {len(pairs)} usable pairs (after dropping pairs longer than {max_len} tokens)")
    random.Random(seed).shuffle(pairs)
    held_out = max(1, int(len(pairs) * eval_fraction))
    return pairs[held_out:], pairs[:held_out]
