"""Offline KD through the real commands: `python -m train.teacher_cache` writes the tiny teacher's top-k log-probs of
the KD stream (two shards, the last one partial), `python -m train kd.teacher_cache=...` distills from them without
the teacher. Its step-0 loss equals the live teacher's full-vocabulary loss at k = V (the tiny vocabulary, 1024) and
lies below it by a printed gap at k = 8 (the log-sum inequality: lumped tokens never raise the KL). A cache of other
data (data.seq_len changed) stops the run with exit 2 and one line naming what differs."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from train.runtime.csv_log import read_metrics

from .conftest import REPO, cli, last_line, small

VOCAB = 1024  # the tiny tokenizer's
KD = ("stages=[init,kd]", "kd.max_steps=2", "trainer.log_every_n_steps=1")


def write_cache(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train.teacher_cache", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def _step0(out: Path) -> float:
    step, loss = read_metrics(out / "kd" / "logs" / "metrics.csv")["train/loss"][0]
    assert step == 0
    return loss


def test_cached_kd_matches_the_live_teacher_and_refuses_a_stale_cache(tmp_path, teacher_cache):
    out = tmp_path / "run"
    caches = {VOCAB: (tmp_path / f"cache_k{VOCAB}", "float32"), 8: (tmp_path / "cache_k8", "float16")}
    keys = {
        k: (f"kd.teacher_cache={cache}", f"kd.teacher_cache_k={k}", f"kd.teacher_cache_dtype={dtype}")
        for k, (cache, dtype) in caches.items()
    }

    def write(k: int) -> subprocess.CompletedProcess:
        return write_cache("--rows-per-shard=3", *small(tmp_path / f"unused_k{k}", teacher_cache, *KD, *keys[k]))

    # Commands that share no directory run two at a time (startup dominates each): the live run and both writes.
    with ThreadPoolExecutor(max_workers=2) as pool:
        live = pool.submit(cli, *small(out, teacher_cache, *KD))
        written = {k: pool.submit(write, k) for k in caches}
        live, written = live.result(), {k: w.result() for k, w in written.items()}
    assert live.returncode == 0, live.stderr[-3000:]
    full = _step0(out)
    manifests = {}
    for k, (cache, _) in caches.items():
        assert written[k].returncode == 0, written[k].stderr[-3000:]
        manifest = manifests[k] = json.loads((cache / "manifest.json").read_text())
        assert manifest["k"] == k and manifest["positions"] == 4 and manifest["teacher"]["name"] == "tiny"
        assert sorted(p.name for p in cache.iterdir()) == ["manifest.json", "shard_00000", "shard_00001"]

    # Beside the cached runs (one after the other in `out`): each cache written again (resumable: finished shards
    # kept; its manifest is rewritten atomically, unchanged) and a run on other data refused.
    with ThreadPoolExecutor(max_workers=2) as pool:
        again = {k: pool.submit(write, k) for k in caches}
        stale_dir = tmp_path / "stale"
        stale = pool.submit(cli, *small(stale_dir, teacher_cache, *KD, *keys[8], "data.seq_len=32"))
        losses = {}
        for k, (cache, _) in caches.items():
            # The same output_dir: the kd stage's settings changed (the cache), so it is redone from init's student.
            cached = cli(*small(out, teacher_cache, *KD, *keys[k], "restart_from=kd"))
            assert cached.returncode == 0, cached.stderr[-3000:]
            logged = (out / ".hydra" / "__main__.log").read_text()
            assert f"distilling from the teacher cache {cache} (k={k}); no teacher loaded" in logged
            losses[k] = _step0(out)
            settings = json.loads((out / "kd" / "settings.json").read_text())
            fingerprint = settings["kd teacher cache"]["fingerprint"]  # part of the rerun fingerprint
            assert fingerprint == manifests[k]["fingerprint"]
            assert (out / "kd" / "student" / "config.json").exists()
        again, stale = {k: a.result() for k, a in again.items()}, stale.result()
    for k in caches:
        assert again[k].returncode == 0 and "0 shards to write" in again[k].stderr, again[k].stderr[-3000:]

    gap = full - losses[8]
    print(f"step-0 KD loss: live full vocabulary {full:.6f}, cache k={VOCAB} {losses[VOCAB]:.6f}, k=8 {losses[8]:.6f}")
    print(f"gap k={VOCAB}: {full - losses[VOCAB]:.2e}; gap k=8: {gap:.4f} ({100 * gap / full:.2f} % of the full KL)")
    assert losses[VOCAB] == pytest.approx(full, rel=1e-5)
    # Below the full KL (lumping never raises it) and above 0 (a KL). The 10-step teacher's distributions are nearly
    # flat and the init student is close to it, so most of the remaining KL sits in the tail k=8 cannot see.
    assert 0 < losses[8] and 0 <= gap <= full

    line = last_line(stale)
    assert stale.returncode == 2, stale.stderr[-2000:]
    assert line.startswith("error: kd.teacher_cache=") and "is stale" in line and "data fingerprint" in line
    assert "seq_len: 64 -> 32" in line and not (stale_dir / "init" / "student").exists()
