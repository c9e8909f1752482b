"""DeepSpeed ZeRO-2 of the real pipeline on 2 CPU processes (gloo; train/runtime/deepspeed_strategy.py): ILD and KD
train,
SIGUSR1 in KD writes that step's sharded checkpoint (exit 138), resuming it on one process is refused in one line
(exit 4), on two it finishes, and the saved students are DeepSpeed's consolidated fp32 master weights."""

from __future__ import annotations

import signal
import subprocess

import torch
from safetensors.torch import load_file

from bench.compare_losses import step_losses
from train.runtime.checkpoint_io import deepspeed_world_size
from train.runtime.deepspeed_strategy import consolidated_state_dict

from .conftest import REPO, cli, driver_command, last_line, small


def test_deepspeed_zero2_on_two_cpu_processes_saves_resumes_and_consolidates(tmp_path, teacher_cache):
    out = tmp_path / "run"
    args = small(out, teacher_cache, "strategy=deepspeed_zero2", "trainer.log_every_n_steps=1", "stages=[init,ild,kd]")
    fault = {"kind": "signal", "stage": "kd", "step": 2, "signal": "SIGUSR1"}
    result = subprocess.run(
        driver_command(fault, *args, "trainer.devices=2"), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 128 + signal.SIGUSR1, result.stderr[-4000:]
    assert "kd: stopped by SIGUSR1" in last_line(result)
    assert (out / "ild" / "done.json").exists() and not (out / "kd" / "done.json").exists()
    last = out / "kd" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and deepspeed_world_size(last) == 2

    # The ILD student on disk is the consolidated fp32 master state of ILD's final ZeRO checkpoint, and it trained.
    ild_last = out / "ild" / "checkpoints" / "last.ckpt"
    master = consolidated_state_dict(ild_last, "students.assigned.")
    saved = load_file(out / "ild" / "student" / "model.safetensors")
    initial = load_file(out / "init" / "student" / "model.safetensors")
    mixer = next(k for k in master if ".mamba.in_proj.weight" in k or ".self_attn.kv_b_proj.weight" in k)
    assert torch.equal(saved[mixer], master[mixer])
    assert not torch.allclose(saved[mixer], initial[mixer])

    result = cli(*args, "trainer.devices=1", timeout=600)
    assert result.returncode == 4, result.stderr[-3000:]
    assert "ZeRO checkpoint of 2 ranks, but this run has 1" in last_line(result)

    result = cli(*args, "trainer.devices=2", timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "kd" / "done.json").exists()
    # The KD loss history spans the interruption: every step once or more (the CSV log is appended on resume, and
    # the preempted step's own row is written before the exit).
    assert sorted(step_losses(out / "kd")) == list(range(4))
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(out / "kd" / "student", trust_remote_code=True)
    assert all(torch.isfinite(p).all() for p in student.parameters())


def _losses(stage_dir) -> list[float]:
    rows = (stage_dir / "logs" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    column = header.index("train/loss")
    return [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]


def test_two_processes_match_one_at_the_same_global_batch(tmp_path, teacher_cache):
    """ZeRO-2 on 2 CPU processes with micro-batch 1 against 1 process with micro-batch 2: the data stream gives both
    the same global batches, so ILD and KD losses agree step by step, up to the per-rank loss normalization (each
    rank averages over its own tokens, DeepSpeed averages the ranks)."""
    runs = {}
    for devices, micro in ((2, 1), (1, 2)):
        out = tmp_path / f"{devices}x{micro}"
        args = small(
            out,
            teacher_cache,
            "strategy=deepspeed_zero2",
            "trainer.log_every_n_steps=1",
            "stages=[init,ild,kd]",
            f"data.micro_batch_size={micro}",
            f"trainer.devices={devices}",
        )
        result = cli(*args, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        runs[devices] = {stage: _losses(out / stage) for stage in ("ild", "kd")}
    for stage in ("ild", "kd"):
        two, one = runs[2][stage], runs[1][stage]
        assert len(two) == len(one) >= 4
        for a, b in zip(two, one, strict=True):
            assert abs(a - b) <= 0.02 * abs(b), (stage, two, one)


def test_zero3_offload_trains_with_deepspeed_cpu_adam(tmp_path, teacher_cache):
    """deepspeed_zero3_offload (parameters and optimizer state in CPU memory) on 2 processes: DeepSpeed refuses
    torch's optimizers under ZeRO-Offload, so the stages must hand it its CPU Adam; KD trains and the consolidated
    student moves away from the initialized one."""
    out = tmp_path / "run"
    args = small(out, teacher_cache, "strategy=deepspeed_zero3_offload", "stages=[init,kd]", "trainer.devices=2")
    result = cli(*args, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    trained = load_file(out / "kd" / "student" / "model.safetensors")
    initial = load_file(out / "init" / "student" / "model.safetensors")
    changed = [k for k in initial if not torch.allclose(trained[k], initial[k])]
    assert len(changed) > len(initial) // 2, f"{len(changed)} of {len(initial)} tensors changed"
