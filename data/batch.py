"""The packed batch: collation from packed rows, and the boundary helpers kernels take (seq_idx, cu_seqlens).

data/ produces token ids, position ids and labels; it never looks at a model. How a model keeps the documents
of a packed batch apart is the model side's business: the student reads `position_ids` (models/documents.py),
a Hugging Face teacher gets a mask from its adapter (`adapter_for(teacher).forward_inputs(teacher, batch)`,
models/teachers/).

A batch is a dict of (B, T) tensors, T = seq_len always (rows are right-padded):

- `input_ids` long.
- `position_ids` long: 0, 1, ... restarting at 0 where each document starts. This is the one
  carrier of document boundaries: a new document starts wherever position_ids == 0. Padding at the
  end of a row is one more pseudo-document (its positions also restart at 0), so it never shares
  attention or recurrent state with real tokens.
- `labels` long, Hugging Face convention (NOT shifted): labels[t] is the token at t, or -100; the
  model's logits at t-1 are scored against it (HF causal LMs shift internally). -100 marks padding,
  masked prompt tokens, and the FIRST token of every document, which would otherwise be predicted
  from the previous document's last token. Use `shift_labels` to get targets aligned with logits.
- `attention_mask` long, 1 for real tokens, 0 for padding (for losses over hidden states). Do not
  hand it to an HF model as its attention mask: that would not separate documents. Use the teacher
  adapter's `forward_inputs` (a 4D block-diagonal causal mask under sdpa) instead.
- `stream_index` (B,) long, training batches only: the rows' positions in the sample stream. The
  datamodule pops it before the batch reaches the LightningModule and uses it to count progress.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100


def collate_rows(rows: list[dict[str, Any]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows (`input_ids`, `loss_mask`, `doc_lens`) -> the padded (B, seq_len) batch above."""
    b = len(rows)
    input_ids = np.full((b, seq_len), pad_id, np.int64)
    position_ids = np.zeros((b, seq_len), np.int64)
    labels = np.full((b, seq_len), IGNORE_INDEX, np.int64)
    attention_mask = np.zeros((b, seq_len), np.int64)
    for i, row in enumerate(rows):
        ids, lens = np.asarray(row["input_ids"]), np.asarray(row["doc_lens"], np.int64)
        n = len(ids)
        starts = np.cumsum(lens) - lens
        input_ids[i, :n] = ids
        attention_mask[i, :n] = 1
        position_ids[i, :n] = np.arange(n) - np.repeat(starts, lens)
        position_ids[i, n:] = np.arange(seq_len - n)  # padding: its own document
        labels[i, :n] = np.where(np.asarray(row["loss_mask"], bool), ids, IGNORE_INDEX)
        labels[i, starts] = IGNORE_INDEX  # never predict a document's first token across the boundary
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "position_ids": torch.from_numpy(position_ids),
        "labels": torch.from_numpy(labels),
        "attention_mask": torch.from_numpy(attention_mask),
    }
    if "stream_index" in rows[0]:  # training rows: where in the sample stream they came from (data/order.py)
        batch["stream_index"] = torch.tensor([int(r["stream_index"]) for r in rows], dtype=torch.long)
    return batch


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with logits: out[:, t] = labels[:, t + 1] (the next token), last column -100."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def seq_idx(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) int32 document index within each row (0, 0, 1, 1, 1, 2, ...): mamba-ssm's `seq_idx`."""
    if (position_ids[:, 0] != 0).any():
        raise ValueError("position_ids must start every row with 0 (a row starts a document)")
    return (torch.cumsum(position_ids == 0, dim=1) - 1).to(torch.int32)


def cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Varlen-kernel boundaries over the flattened (B*T) batch: (cu_seqlens int32 (S+1,), max_seqlen)."""
    flat = position_ids.reshape(-1)
    if (position_ids[:, 0] != 0).any():
        raise ValueError("position_ids must start every row with 0 (a row starts a document)")
    starts = torch.nonzero(flat == 0).reshape(-1)
    bounds = torch.cat([starts, starts.new_tensor([flat.numel()])])
    return bounds.to(torch.int32), int((bounds[1:] - bounds[:-1]).max())
