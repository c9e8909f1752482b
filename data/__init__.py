"""Data pipeline: sources -> tokenization -> document-aware packing -> deterministic, resumable order.

Public entry points: `DataConfig`/`SourceConfig` (data.config), `DistillDataModule` (data.datamodule),
the batch helpers in data.batch, and the embedded corpus in data.corpus. See data/batch.py for the
batch layout and label convention.

The batch helpers import torch, so they load on first use: reading the config (`python -m train` checks it
before anything heavy loads) stays fast.
"""

from data.config import DataConfig, SourceConfig

_BATCH = (
    "IGNORE_INDEX",
    "collate_rows",
    "cu_seqlens",
    "seq_idx",
    "shift_labels",
)

__all__ = ["DataConfig", "SourceConfig", *_BATCH]


def __getattr__(name: str):
    if name in _BATCH:
        from data import batch

        return getattr(batch, name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
