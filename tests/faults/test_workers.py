"""DataLoader workers under cluster signals: SIGUSR1 (sent to every process of a SLURM job) leaves them serving, and
the process still exits at once afterwards (multiprocessing ends leftover workers with SIGTERM at exit)."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO

SCRIPT = """
import os, signal
from data.config import DataConfig
from data.datamodule import DistillDataModule

dm = DistillDataModule(DataConfig(seq_len=64, micro_batch_size=2, num_workers=1, eval_max_rows=4))
dm.setup()
batches = iter(dm.train_dataloader())
next(batches)
for worker in batches._workers:
    os.kill(worker.pid, signal.SIGUSR1)
next(batches)
next(iter(dm.val_dataloader()))  # persistent workers still alive when the interpreter exits
print("served after SIGUSR1")
"""


def test_workers_ignore_sigusr1_and_do_not_hold_up_exit():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "served after SIGUSR1" in result.stdout
