"""bench/train.py end to end on CPU at tiny shapes (--smoke): the Trainer runs and the phase loop of the real
KD / ILD modules produce the results file with FLOPs that agree with models/flops.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_training_benchmark_smoke_writes_results(tmp_path):
    out = tmp_path / "train.json"
    command = [sys.executable, "-m", "bench.train", "--smoke", "--stages", "kd,ild", "--steps", "2", "--breakdown"]
    result = subprocess.run([*command, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {"card", "date", "versions"} <= results.keys()
    kd, ild = results["results"]["kd/auto/1x/smoke/mb2"], results["results"]["ild/auto/1x/smoke/mb2"]
    assert kd["steps_timed"] == 2 and kd["tokens_per_s_per_gpu"] > 0
    assert kd["flops_per_token"] > ild["flops_per_token"] > 0  # KD adds both lm_heads and the student backward
    assert 1 < kd["mean_attention_context"] < 128  # packed documents: fewer keys than the row length
    phases = results["results"]["breakdown/kd/smoke/mb2"]["phase_ms"]
    assert set(phases) == {"data", "teacher_forward", "student_forward", "loss", "backward", "optimizer"}
    assert all(ms >= 0 for ms in phases.values())
