"""Which process of a multi-process run this is, and how the others wait for rank 0's files.

Every rank runs the same pipeline (torchrun and srun start them together; Lightning's own launcher starts the
others at the first `fit`). Training is collective; everything else that writes (init, select, eval, export,
saving students, done.json, report.json) is rank 0's. The other ranks wait for rank 0's `done.json` of each stage
before they go on, so they never read a student rank 0 is still writing. No process group exists between stages
(Lightning creates it inside `fit`), hence the file-based wait.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


def process_rank() -> int:
    """The global rank from the launcher's environment (RANK, LOCAL_RANK, SLURM_PROCID), as Lightning reads it."""
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def is_rank_zero() -> bool:
    return process_rank() == 0


def wait_for_file(path: Path, what: str, timeout_s: float = 24 * 3600.0, failed: Path | None = None) -> None:
    """Block until rank 0 has written `path`; raise if `failed` appears first (rank 0 stopped with an error) or
    the wait outlasts `timeout_s`."""
    start = time.monotonic()
    logged = False
    while not path.exists():
        if failed is not None and failed.exists():
            raise RuntimeError(f"rank 0 failed during {what}: {failed.read_text().strip()[:300]}")
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"rank {process_rank()} waited {timeout_s:.0f} s for rank 0 to finish {what} ({path})")
        if not logged:
            log.info("rank %d: waiting for rank 0 to finish %s", process_rank(), what)
            logged = True
        time.sleep(1.0)
