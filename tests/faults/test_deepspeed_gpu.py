"""DeepSpeed ZeRO-2 on two GPUs (marked gpu: skipped without two CUDA devices). A NaN loss is dropped (DeepSpeed
discards steps with non-finite gradients, the guard counts them), SIGUSR1 writes the checkpoint directory of the
current step (exit 138), resuming it on one GPU is refused in one line (exit 4), on two it finishes."""

from __future__ import annotations

import signal
import subprocess

import pytest
import torch

from train.runtime.checkpoint_io import deepspeed_world_size

from .conftest import REPO, cli, driver_command, last_line, small

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]


def test_deepspeed_zero2_nan_preemption_and_world_size(tmp_path, teacher_cache):
    out = tmp_path / "run"
    gpu = ["trainer=gpu", "strategy=deepspeed_zero2", "trainer.log_every_n_steps=1", "stages=[init,ild]"]
    args = small(out, teacher_cache, *gpu)
    faults = [
        {"kind": "nan", "stage": "ild", "steps": [1]},
        {"kind": "signal", "stage": "ild", "step": 3, "signal": "SIGUSR1"},
    ]
    result = subprocess.run(
        driver_command(faults, *args, "trainer.devices=2"), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    print(result.stderr[-4000:])
    assert result.returncode == 128 + signal.SIGUSR1, result.stderr[-4000:]
    assert "ild: stopped by SIGUSR1 after step 4" in last_line(result)
    last = out / "ild" / "checkpoints" / "last.ckpt"
    print(sorted(str(p.relative_to(last)) for p in last.rglob("*")))
    assert last.is_dir() and deepspeed_world_size(last) == 2
    assert "train/nonfinite_skips" in (out / "ild" / "logs" / "metrics.csv").read_text()

    result = cli(*args, "trainer.devices=1", timeout=600)
    print(last_line(result))
    assert result.returncode == 4 and "ZeRO checkpoint of 2 ranks, but this run has 1" in last_line(result)

    result = cli(*args, "trainer.devices=2", timeout=600)
    print(result.stderr[-3000:])
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "ild" / "done.json").exists()
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(out / "ild" / "student", trust_remote_code=True)
    assert all(torch.isfinite(p).all() for p in student.parameters())
