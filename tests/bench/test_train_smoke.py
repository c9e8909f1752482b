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


def test_accumulated_steps_count_every_micro_batch(tmp_path):
    out = tmp_path / "train.json"
    command = [sys.executable, "-m", "bench.train", "--smoke", "--stages", "kd,kd_cached", "--steps", "2"]
    result = subprocess.run([*command, "--accumulate", "2", "--out", str(out)], cwd=REPO, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    for stage in ("kd", "kd_cached"):  # offline KD: the same student from a cache file, no teacher
        kd = results[f"{stage}/auto/1x/smoke/mb2x2"]
        assert kd["steps_timed"] == 2 and kd["accumulate_grad_batches"] == 2
        tokens_per_step = kd["tokens_per_s_per_gpu"] * kd["step_ms"] / 1e3
        assert abs(tokens_per_step - 2 * 2 * 128) < 1e-6  # micro-batch x accumulation x sequence
    assert results["kd_cached/auto/1x/smoke/mb2x2"]["flops_per_token"] < results["kd/auto/1x/smoke/mb2x2"][
        "flops_per_token"]  # fmt: skip


def test_step_timer_sums_the_micro_batches_of_an_optimizer_step(monkeypatch):
    """Times of micro-batches 0.1 s (the optimizer's one 0.5 s): per optimizer step 0.1 + 0.5, warmup left out."""
    from types import SimpleNamespace

    from bench import train as bench_train

    clock = iter([0.0, 0.1, 0.1, 0.6, 1.0, 1.1, 1.1, 1.6, 2.0, 2.1, 2.1, 2.6])  # start/end of 6 micro-batches
    monkeypatch.setattr(bench_train.time, "perf_counter", lambda: next(clock))
    timer = bench_train.StepTimer(warmup=1)
    trainer = SimpleNamespace(global_step=0, is_global_zero=False)
    for batch_idx in range(6):
        trainer.global_step = batch_idx // 2
        timer.on_train_batch_start(trainer, None, None, batch_idx)
        timer.on_train_batch_end(trainer, None, None, None, batch_idx)
    assert [round(s, 6) for s in timer.steps] == [0.6, 0.6]
    assert [round(s, 6) for s in timer.data] == [0.4, 0.0, 0.4, 0.0]  # waits before micro-batches 2 to 5


def test_unknown_strategy_is_refused_before_models_are_built(tmp_path):
    command = [sys.executable, "-m", "bench.train", "--smoke", "--strategy", "deepspeed_zero4"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "deepspeed_zero4" in result.stderr
    assert "building" not in result.stdout


def test_every_preset_student_builds_from_its_typed_settings():
    """The non-smoke presets take the preset path the smoke runs skip (typed student settings, checkpointing);
    built on the meta device, so a 3B shape costs nothing."""
    import torch

    from bench import train as bench_train

    for preset in bench_train.PRESET_TEACHER:
        student = bench_train.build_student(preset, torch.device("meta"))
        settings = bench_train.preset_student(preset)
        assert student.is_gradient_checkpointing == settings.gradient_checkpointing, preset
        assert sum(p.numel() for p in student.parameters()) > 5e8, preset


def test_long_context_rows_are_recorded_per_length_and_plotted(tmp_path):
    """bench/run_long_context.sh's rows: each length and masking its own results key, and the plots read them back
    (tokens/s, and peak memory per token) in length order."""
    from bench.plots import long_context_series, plot_long_context

    out = tmp_path / "long.json"
    base = [sys.executable, "-m", "bench.train", "--preset", "smoke", "--teacher", "smoke", "--stages", "kd"]
    for seq, batch in ((128, 2), (64, 4)):  # same tokens per step, as the script runs them
        extra = ["--seq", str(seq), "--micro-batch", str(batch), "--masking", "dense", "--doc-len", "40"]
        command = [*base, *extra, "--steps", "2", "--warmup", "1", "--out", str(out)]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    keys = {"kd/auto/1x/smoke/mb2/seq128/doc40/dense", "kd/auto/1x/smoke/mb4/seq64/doc40/dense"}
    assert keys <= set(results["results"])
    rows = long_context_series(results)[("kd", "dense")]
    assert [seq for seq, _, _ in rows] == [64, 128] and all(tps > 0 for _, tps, _ in rows)
    paths = plot_long_context(results, tmp_path / "long")
    assert [p.name for p in paths] == ["long_throughput.png", "long_memory.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_synthetic_teacher_cache_removes_its_folder_with_the_cache():
    """The benchmark's kd_cached case writes MBs of shards to a temporary folder per case: gone with the cache."""
    import gc

    import torch

    from bench.train import SyntheticPacked, synthetic_teacher_cache

    cache = synthetic_teacher_cache(SyntheticPacked(rows=3, seq_len=16, vocab=50, doc_len=8), k=4, rows_per_shard=2)
    folder = cache.path
    ids, _, _ = cache.lookup(torch.tensor([0, 2]))
    assert folder.is_dir() and ids.shape == (2, 16, 4)
    del cache, ids
    gc.collect()
    assert not folder.exists()
