"""Data pipeline: sources -> tokenization -> document-aware packing -> deterministic, resumable order.

Public entry points: `DataConfig`/`SourceConfig` (data.config), `DistillDataModule` (data.datamodule),
the batch helpers in data.batch, and the embedded corpus in data.corpus. See data/batch.py for the
batch layout and label convention.
"""

from data.batch import (
    IGNORE_INDEX,
    collate_rows,
    cu_seqlens,
    packed_causal_mask,
    seq_idx,
    shift_labels,
    teacher_inputs,
)
from data.config import DataConfig, SourceConfig

__all__ = [
    "IGNORE_INDEX",
    "DataConfig",
    "SourceConfig",
    "collate_rows",
    "cu_seqlens",
    "packed_causal_mask",
    "seq_idx",
    "shift_labels",
    "teacher_inputs",
]
