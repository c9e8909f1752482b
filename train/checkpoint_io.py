"""Checkpoints written atomically: to a temporary file in the same folder, fsynced, then renamed over the
target. A crash mid-write (kill -9, full disk) leaves the previous checkpoint intact and loadable."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(
        self, path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # Our checkpoints hold plain tensors, numbers and dicts (no pickled classes) except Lightning's own
        # loop state; weights_only=False is Lightning's default for its own files.
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
