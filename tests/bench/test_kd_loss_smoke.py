"""bench/kd_loss.py on CPU at tiny shapes: the harness runs our torch-ops loss, records it, and the loss it
reports is forward KL(teacher || student) per token, recomputed here from the same inputs in fp64."""

from __future__ import annotations

import json
import sys

import torch

from bench import kd_loss as bench_kd_loss


def test_kd_loss_benchmark_smoke_reports_forward_kl(tmp_path, monkeypatch):
    out = tmp_path / "kd_loss.json"
    monkeypatch.setattr(sys, "argv", ["bench.kd_loss", "--smoke", "--out", str(out)])
    bench_kd_loss.main()
    entry = json.loads(out.read_text())["results"]["kd_loss/t64_h32_v1000_c16"]
    assert entry["ours_fused_triton"].startswith("not run") and entry["liger_fused_linear_jsd_beta0"].startswith("not")
    measured = entry["ours_torch_ops"]
    assert measured["ms"] > 0 and measured["grad_max_diff_vs_first"] == [0.0, 0.0]

    data = bench_kd_loss.inputs(64, 32, 1000, torch.device("cpu"), torch.float32)
    student = torch.log_softmax(data["student_hidden"].double() @ data["student_weight"].double().T, -1)
    teacher = torch.log_softmax(data["teacher_hidden"].double() @ data["teacher_weight"].double().T, -1)
    kl = (teacher.exp() * (teacher - student)).sum(-1).mean()
    assert abs(measured["loss"] - float(kl)) < 1e-4 * float(kl)
