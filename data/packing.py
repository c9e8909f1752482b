"""Pack tokenized documents into rows of at most `seq_len` tokens without cutting documents.

Documents are bin-packed (best fit decreasing) a window of `pack_window` documents at a time; a
document never straddles two rows. Each row stores its documents back to back with their lengths
(`doc_lens`), from which the collator derives position ids that restart at 0 per document.
Documents longer than `seq_len` follow `long_sample`: "split" into `seq_len` pieces (each piece is
then a document of its own; a tail shorter than `min_doc_tokens` is dropped), "truncate" to the
first `seq_len` tokens, or "drop" (already filtered out in data/tokenize.py).

The packing runs in one process on purpose: the result depends on window boundaries, and a
worker count that varied with the machine would change the rows and so the sample order.
"""

from __future__ import annotations

from bisect import bisect_left, insort

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.config import DataConfig
from data.tokenize import fingerprint

VERSION = 1  # bump when the packing rule changes: invalidates cached rows
FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "loss_mask": datasets.List(datasets.Value("bool")),
        "doc_lens": datasets.List(datasets.Value("int32")),
    }
)


def pieces(lengths: np.ndarray, seq_len: int, policy: str, min_tokens: int) -> tuple[np.ndarray, ...]:
    """Cut documents into pieces that fit a row: (doc index, start, length) arrays."""
    n_pieces = np.ones_like(lengths)
    if policy == "split":
        n_pieces = -(-lengths // seq_len)
    doc = np.repeat(np.arange(len(lengths)), n_pieces)
    first = np.cumsum(n_pieces) - n_pieces  # index of each document's first piece
    k = np.arange(len(doc)) - np.repeat(first, n_pieces)  # piece number within its document
    start = k * seq_len
    length = np.minimum(lengths[doc] - start, seq_len)
    keep = length >= min_tokens
    return doc[keep], start[keep], length[keep]


def best_fit_decreasing(lengths: np.ndarray, capacity: int, min_free: int = 1) -> list[list[int]]:
    """Bins (lists of item indices) with total length <= capacity; deterministic.

    Longest item first, each into the fullest bin that still has room; bins with less than
    `min_free` room are closed (nothing useful fits there any more).
    """
    open_bins: list[tuple[int, int]] = []  # sorted (free room, bin id)
    bins: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable").tolist():
        need = int(lengths[i])
        j = bisect_left(open_bins, (need, -1))
        if j == len(open_bins):
            bins.append([i])
            free, b = capacity - need, len(bins) - 1
        else:
            free, b = open_bins.pop(j)
            bins[b].append(i)
            free -= need
        if free >= min_free:
            insort(open_bins, (free, b))
    return [sorted(b) for b in bins]


def pack_table(table: pa.Table, seq_len: int, policy: str, min_tokens: int) -> pa.Table:
    """Pack one window of documents (an arrow table with input_ids and loss_mask) into rows."""
    ids_col = table.column("input_ids").combine_chunks()
    mask_col = table.column("loss_mask").combine_chunks()
    lengths = pc.list_value_length(ids_col).to_numpy(zero_copy_only=False).astype(np.int64)
    flat_ids = pc.list_flatten(ids_col).to_numpy(zero_copy_only=False)
    flat_mask = pc.list_flatten(mask_col).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)])

    doc, start, length = pieces(lengths, seq_len, policy, min_tokens)
    bins = best_fit_decreasing(length, seq_len, min_free=min_tokens)
    order = np.concatenate(bins) if bins else np.zeros(0, np.int64)  # pieces in row order
    piece_len = length[order]
    # Token gather index: for each piece in row order, the range offsets[doc] + start + [0, len).
    piece_first = offsets[doc[order]] + start[order]
    within = np.arange(piece_len.sum()) - np.repeat(np.cumsum(piece_len) - piece_len, piece_len)
    gather = np.repeat(piece_first, piece_len) + within

    row_sizes = np.array([len(b) for b in bins], np.int64)  # pieces per row
    row_tokens = np.add.reduceat(piece_len, np.cumsum(row_sizes) - row_sizes) if bins else row_sizes
    tok_off = pa.array(np.concatenate([[0], np.cumsum(row_tokens)]).astype(np.int32))
    doc_off = pa.array(np.concatenate([[0], np.cumsum(row_sizes)]).astype(np.int32))
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(tok_off, pa.array(flat_ids[gather].astype(np.int32))),
            "loss_mask": pa.ListArray.from_arrays(tok_off, pa.array(flat_mask[gather].astype(bool))),
            "doc_lens": pa.ListArray.from_arrays(doc_off, pa.array(piece_len.astype(np.int32))),
        }
    )


def pack_documents(docs: datasets.Dataset, cfg: DataConfig) -> datasets.Dataset:
    """Packed rows, cached under a fingerprint of the documents and the packing options."""
    fp = fingerprint(
        "pack", VERSION, docs._fingerprint, cfg.seq_len, cfg.long_sample, cfg.min_doc_tokens, cfg.pack_window
    )

    def fn(table: pa.Table) -> pa.Table:
        return pack_table(table, cfg.seq_len, cfg.long_sample, cfg.min_doc_tokens)

    return (
        docs.with_format("arrow")
        .map(
            fn,
            batched=True,
            batch_size=cfg.pack_window,
            remove_columns=docs.column_names,
            features=FEATURES,
            new_fingerprint=fp,
            desc="pack",
        )
        .with_format(None)
    )
