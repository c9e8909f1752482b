"""Helpers for the fault tests: the real CLI in a subprocess, a shrunk tiny preset, one tiny teacher per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def small(out: Path, teacher_cache: Path, *extra: str) -> list[str]:
    """Overrides shrinking the tiny preset to seconds: a 10-step teacher, 64-token rows, 6 ILD and 4 KD steps."""
    return [
        f"output_dir={out}",
        f"teacher.tiny.cache_dir={teacher_cache}",
        "teacher.tiny.train_steps=10",
        "teacher.tiny.batch_size=4",
        "teacher.tiny.seq_len=64",
        "data.seq_len=64",
        "data.micro_batch_size=2",
        "data.num_workers=0",
        "data.eval_max_rows=2",
        "ild.max_steps=6",
        "ild.warmup_steps=1",
        "ild.val_every_n_steps=100",
        "ild.checkpoint_every_n_steps=2",
        "kd.max_steps=4",
        "kd.warmup_steps=1",
        "kd.val_every_n_steps=100",
        "kd.checkpoint_every_n_steps=2",
        "eval.max_batches=1",
        "eval.num_generations=0",
        "trainer.enable_progress_bar=false",
        *extra,
    ]


def cli(*args: str, env: dict | None = None, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """`python -m train <args>` from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "train", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        **popen,
    )


def driver_command(fault: dict, *args: str) -> list[str]:
    """`python -m train <args>` with one injected fault (tests/faults/driver.py)."""
    return [sys.executable, "-m", "tests.faults.driver", json.dumps(fault), *args]


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_teacher")


# Fake credentials: no output of a run may contain them (tests/faults/test_security.py).
SECRETS = {"WANDB_API_KEY": "wandb0secret0key0" + "7" * 23, "HF_TOKEN": "hf_SecretTokenForTests0123456789"}


@pytest.fixture(scope="session")
def reference(tmp_path_factory, teacher_cache) -> tuple[Path, subprocess.CompletedProcess]:
    """One uninterrupted run (init, ild, kd) through the CLI, with credentials in its environment and the W&B
    logger (offline): the weights interrupted runs must reach, and the outputs secrets must stay out of."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = cli(
        *small(out, teacher_cache, "stages=[init,ild,kd]", "logger=wandb", "logger.offline=true"),
        env={**SECRETS, "WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result
