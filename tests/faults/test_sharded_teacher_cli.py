"""`teacher.shard=true` through the real CLI on 2 CPU processes (ZeRO-3, gloo): ILD and KD train against the
partitioned teacher, and what runs after a stage on rank 0 alone (ILD's held-out layer losses, eval) gets the teacher
whole again instead of waiting forever on a gather the other rank never joins. The numerics (losses and gradients
equal the replicated teacher's) are tests/train/test_sharded_teacher_cpu.py's."""

from __future__ import annotations

import json
import math

from transformers import AutoModelForCausalLM

from .conftest import cli, small


def test_sharded_teacher_pipeline_trains_and_evaluates(tmp_path, teacher_cache):
    out = tmp_path / "run"
    args = small(out, teacher_cache, "strategy=deepspeed_zero3", "teacher.shard=true", "stages=[init,ild,kd,eval]")
    result = cli(*args, "trainer.devices=2", env={"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert all((out / stage / "done.json").exists() for stage in ("ild", "kd", "eval"))
    report = json.loads((out / "report.json").read_text())
    losses = [v for layer in report["ild"]["layer_losses"].values() for v in layer.values()]
    assert losses and all(math.isfinite(v) for v in losses)
    # eval counted the teacher's parameters whole: it was loaded again, not left in ZeRO-3 slices
    whole = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(report["teacher"]).parameters())
    assert report["eval"]["teacher"]["params"] == whole
    assert math.isfinite(report["eval"]["teacher"]["loss"])
