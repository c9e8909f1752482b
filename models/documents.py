"""Document boundaries from position ids, shared by both mixers.

A new document starts wherever `position_ids == 0` (packed batches restart positions per document; left
padding uses position 1 for pads, so the real prompt starts a document of its own). From that one rule:
Mamba2 gets `seq_idx` (its state and conv reset at each start) and MLA gets, for every query, the absolute
index where its document starts (keys before it are masked). Both also hold across calls with a cache.
A Hugging Face teacher gets the same boundaries as a 4D block-diagonal causal mask (`packed_causal_mask`).

Long packed rows: a dense (B, 1, T, T) mask is quadratic (1 GiB per row at 32K) and keeps attention kernels from
skipping the blocks between documents. On CUDA the same boundaries become a FlexAttention `BlockMask`
(`document_block_mask`), which stores per block whether it is empty, full or partial; the dense mask stays the
reference on CPU (`DOCUMENT_MASKINGS`, `use_block_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# How packed documents are kept apart in attention: "dense" a (B, 1, T, T) bool mask, "flex" a FlexAttention
# BlockMask, "auto" flex on CUDA and dense elsewhere (CPU FlexAttention runs unfused and gains nothing).
DOCUMENT_MASKINGS = ("auto", "dense", "flex")
BLOCK_SIZE = 128  # FlexAttention's tile: blocks of 128 queries x 128 keys are skipped when empty


@dataclass
class Documents:
    seq_idx: torch.Tensor  # (B, T) int32, nondecreasing document number within this call
    doc_start: torch.Tensor  # (B, T) long, absolute index (cache included) where each token's document starts
    continues_cache: torch.Tensor  # (B,) bool, the first token continues the cached document
    past_len: int  # tokens already in the cache
    # No row starts a document after its first token: Mamba2 needs no seq_idx and, without a cache,
    # MLA needs no mask beyond causal. One host sync per forward, paid once for all layers.
    single_document: bool
    # Set by the model for a forward without a cache over several documents, where `use_block_mask` says so:
    # MLA layers then attend through FlexAttention instead of a dense mask. Built once, shared by all layers.
    block_mask: Any = None


def document_index(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) int32 document number of every token within its row (Mamba2's `seq_idx`): no host sync."""
    return torch.cumsum((position_ids == 0).to(torch.int32), dim=1, dtype=torch.int32)


def documents_from_positions(
    position_ids: torch.Tensor, past_len: int = 0, cached_doc_start: torch.Tensor | None = None
) -> Documents:
    batch, length = position_ids.shape
    is_start = position_ids == 0
    seq_idx = document_index(position_ids)
    index = torch.arange(past_len, past_len + length, device=position_ids.device).expand(batch, length)
    starts = torch.where(is_start, index, torch.full_like(index, -1))
    doc_start = torch.cummax(starts, dim=1).values
    carried = cached_doc_start if cached_doc_start is not None else torch.zeros_like(doc_start[:, 0])
    doc_start = torch.where(doc_start < 0, carried[:, None].to(doc_start.dtype), doc_start)
    continues = (~is_start[:, 0]) & (past_len > 0)
    single = length == 1 or not bool(is_start[:, 1:].any())  # no host sync per decoded token (CUDA graphs)
    return Documents(seq_idx, doc_start, continues, past_len, single)


def positions_from_attention_mask(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """HF convention for padded batches: position = cumsum(mask) - 1, pads at 1; the last `length` columns."""
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, -length:]


def packed_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """(B, 1, T, T) mask: causal within each document, nothing across documents.

    bool (default): True = may attend, what SDPA takes. A floating dtype gives the additive form
    (0 or the dtype's minimum) that HF's eager attention adds to its scores; eager would silently
    add a bool mask as 0/1. HF models use a 4D mask as given; restarting position ids alone do not
    isolate documents there.
    """
    if (position_ids[:, 0] != 0).any():
        raise ValueError("position_ids must start every row with 0 (a row starts a document)")
    doc = document_index(position_ids)  # (B, T); not documents_from_positions: its single-document test syncs
    t = position_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    keep = ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]  # (B, 1, T, T)
    if dtype == torch.bool:
        return keep
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


def use_block_mask(masking: str, device: torch.device) -> bool:
    """Whether `masking` (one of DOCUMENT_MASKINGS) means a FlexAttention BlockMask on `device`."""
    if masking not in DOCUMENT_MASKINGS:
        raise ValueError(f"document_masking={masking!r} is invalid; allowed: {list(DOCUMENT_MASKINGS)}")
    if masking == "flex" and device.type == "cpu" and torch.is_grad_enabled():
        raise ValueError(
            "document_masking='flex' trains on CUDA only (FlexAttention has no CPU backward); "
            "use 'auto' or 'dense' on the CPU, or run under torch.no_grad()"
        )
    return masking == "flex" or (masking == "auto" and device.type == "cuda")


def document_block_mask(position_ids: torch.Tensor) -> Any:
    """The `packed_causal_mask` of `position_ids` as a FlexAttention BlockMask (B, 1, T, T): causal within each
    document. Blocks wholly before a query block's documents are never computed; memory is O(T^2 / 128^2).

    Built from the documents' block ranges in plain torch, not by `create_block_mask`: its eager form evaluates
    the mask at every (query, key) pair (the dense cost we avoid) and its compiled form sent ptxas past 3 minutes
    on one H100 at 16K (a fresh Inductor kernel per length). Rows are nondecreasing in document number, so a
    (query block, key block) pair below the diagonal holds a common document iff the key block's last document
    reaches the query block's first, and is full iff both blocks lie in one document."""
    from torch.nn.attention.flex_attention import BlockMask

    if (position_ids[:, 0] != 0).any():
        raise ValueError("position_ids must start every row with 0 (a row starts a document)")
    doc = document_index(position_ids)
    length = position_ids.shape[1]
    starts = torch.arange(0, length, BLOCK_SIZE, device=doc.device)
    ends = (starts + BLOCK_SIZE - 1).clamp(max=length - 1)
    first, last = doc[:, starts], doc[:, ends]  # (B, n) document of each block's first / last token
    n = starts.numel()
    index = torch.arange(n, device=doc.device)
    below = index[None, :] < index[:, None]  # (q block, kv block) strictly below the diagonal
    complete = ends - starts + 1 == BLOCK_SIZE  # a last, shorter block is never called full
    whole = complete[None, :, None] & complete[None, None, :]
    shared = last[:, None, :] >= first[:, :, None]  # the key block's last document reaches the query block's first
    full = below & whole & (first[:, None, :] == last[:, :, None])  # (B, n, n): one document throughout
    partial = ((below & shared) | torch.eye(n, dtype=torch.bool, device=doc.device)) & ~full

    def as_blocks(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # counts, kept indices first
        order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
        return keep.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    def same_document_causal(b, h, q, k):
        return (k <= q) & (doc[b, q] == doc[b, k])

    return BlockMask.from_kv_blocks(
        *as_blocks(partial),
        *as_blocks(full),
        BLOCK_SIZE=BLOCK_SIZE,
        mask_mod=same_document_causal,
        seq_lengths=(length, length),
    )
