"""The teacher cache of offline KD (`kd.teacher_cache`): its files, what identifies it, and reading it.

`python -m train.teacher_cache` (train/teacher_cache.py) runs the KD teacher once over the KD stream and writes, per
stream position (data/order.py: position g of the global sample stream, the same at any world size) and per token of
its packed row, the teacher's top-k ids, their log-probs and the log of the remaining mass:

    <kd.teacher_cache>/manifest.json           what the cache is (MATCH: data fingerprint, k, teacher, ...)
    <kd.teacher_cache>/shard_00000/ids.npy     (R, seq_len, k) int32, sorted by decreasing probability
                                   logp.npy    (R, seq_len, k) float32 | float16 (kd.teacher_cache_dtype)
                                   rest.npy    (R, seq_len) float32, -inf where the top-k hold all the mass
    ...                                        shard s: stream positions [s R, (s + 1) R), R = rows_per_shard

A shard is written into `shard_XXXXX.tmp/` and renamed when whole (a directory rename is atomic), so a shard that
exists is complete; a rerun of the writer skips them. The kd stage (train/stages/kd.py) reads each batch's rows by
the `stream_index` its rows carry, so resume and any number of ranks read what the live teacher would have computed.
A cache whose MATCH keys differ from the run's, or that does not cover the run's KD steps, is refused in one line
before training (`open_teacher_cache`, exit 2), as a resumed data stream is refused on other data.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.build import PhaseData
from data.datamodule import DistillDataModule
from train.config import ConfigError, TrainConfig
from train.runtime.cluster import world_size

from .rerun import teacher_files
from .teachers import kd_teacher_dtype, resolve_teacher

VERSION = 1
MANIFEST = "manifest.json"
MATCH = ("version", "fingerprint", "seed", "seq_len", "k", "dtype", "temperature", "teacher")
FILES = ("ids", "logp", "rest")


def stream_rows_needed(cfg: TrainConfig) -> int:
    """Stream positions the kd stage consumes: kd.max_steps optimizer steps of global batches."""
    return cfg.kd.max_steps * cfg.trainer.accumulate_grad_batches * cfg.data.micro_batch_size * world_size(cfg)


def teacher_identity(cfg: TrainConfig) -> dict[str, Any]:
    """Which teacher made the log-probs: its name, its resolved folder's name (the tiny teacher's is keyed by its
    settings), its weight files and sizes (a swapped teacher behind the same path differs), its dtype."""
    name = cfg.kd.teacher_name_or_path or cfg.teacher.name_or_path
    path = resolve_teacher(name, cfg)
    return {"name": name, "dir": Path(path).name, "dtype": kd_teacher_dtype(cfg), "weight_files": teacher_files(path)}


def kd_phase(cfg: TrainConfig, tokenizer: Any) -> PhaseData:
    """The packed rows of the KD stream (built once, then read from the datasets cache)."""
    datamodule = DistillDataModule(cfg.data, tokenizer, phase="kd")
    datamodule.setup()
    return datamodule.phases["kd"]


def expected_manifest(cfg: TrainConfig, data: PhaseData, rows_per_shard: int) -> dict[str, Any]:
    kd = cfg.kd
    return {
        "version": VERSION,
        "fingerprint": data.fingerprint,
        "seed": cfg.data.seed,
        "seq_len": data.seq_len,
        "k": kd.teacher_cache_k,
        "dtype": kd.teacher_cache_dtype,
        "temperature": float(kd.temperature),
        "teacher": teacher_identity(cfg),
        "num_rows": len(data.rows),
        "positions": stream_rows_needed(cfg),
        "rows_per_shard": rows_per_shard,
    }


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    file = Path(path) / MANIFEST
    return json.loads(file.read_text()) if file.exists() else None


def differences(saved: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """'key: cache value -> run value' for every MATCH key that differs (the teacher's fields one by one)."""
    out = []
    for key in MATCH:
        a, b = saved.get(key), expected.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"teacher.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in b if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{'data fingerprint' if key == 'fingerprint' else key}: {a!r} -> {b!r}")
    return out


def shard_dir(path: str | Path, shard: int) -> Path:
    return Path(path) / f"shard_{shard:05d}"


def shard_rows(path: str | Path, shard: int) -> int | None:
    """Rows in a finished shard, None if it is not there."""
    rest = shard_dir(path, shard) / "rest.npy"
    return int(np.load(rest, mmap_mode="r").shape[0]) if rest.exists() else None


def write_shard(path: str | Path, shard: int, arrays: dict[str, np.ndarray]) -> None:
    """Atomic: the three arrays into shard_XXXXX.tmp/, then the folder renamed (replacing a shorter old one)."""
    final = shard_dir(path, shard)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in FILES:
        np.save(tmp / f"{name}.npy", arrays[name])
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> None:
    from train.stages.context import write_json  # the pipeline's atomic JSON write (tmp + rename)

    Path(path).mkdir(parents=True, exist_ok=True)
    write_json(Path(path) / MANIFEST, manifest)


class TeacherCache:
    """Read access to a checked cache: `lookup(stream positions)` -> the teacher's top-k of those rows."""

    def __init__(self, path: str | Path, manifest: dict[str, Any]) -> None:
        self.path, self.manifest = Path(path), manifest
        self.rows_per_shard = int(manifest["rows_per_shard"])
        self._open: dict[int, dict[str, np.ndarray]] = {}  # memory maps of the shards read so far

    def _shard(self, shard: int) -> dict[str, np.ndarray]:
        if shard not in self._open:
            self._open[shard] = {n: np.load(shard_dir(self.path, shard) / f"{n}.npy", mmap_mode="r") for n in FILES}
        return self._open[shard]

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids (B, T, k) int32, logp (B, T, k), rest (B, T)) of the rows at these stream positions (B,)."""
        pos = positions.cpu().numpy().astype(np.int64)
        if pos.min() < 0 or pos.max() >= self.manifest["positions"]:
            raise ConfigError(
                f"kd.teacher_cache={str(self.path)!r} covers stream positions [0, {self.manifest['positions']}), "
                f"this step needs position {int(pos.max())}; rewrite it with python -m train.teacher_cache and this "
                "run's overrides (kd.max_steps, batch size and world size decide how many)"
            )
        parts = {n: [] for n in FILES}
        for p in pos.tolist():
            shard = self._shard(p // self.rows_per_shard)
            for n in FILES:
                parts[n].append(shard[n][p % self.rows_per_shard])
        return tuple(torch.from_numpy(np.stack(parts[n])) for n in FILES)


def open_teacher_cache(cfg: TrainConfig, tokenizer: Any) -> TeacherCache:
    """The cache `kd.teacher_cache` names, checked against this run: the same KD data (fingerprint), k, dtype,
    temperature and teacher, and every shard the run's kd.max_steps read. ConfigError (one line) otherwise."""
    path = cfg.kd.teacher_cache
    where = f"kd.teacher_cache={path!r}"
    saved = read_manifest(path)
    if saved is None:
        raise ConfigError(f"{where} holds no {MANIFEST}; write the cache first: python -m train.teacher_cache <this "
                          "run's overrides>")  # fmt: skip
    expected = expected_manifest(cfg, kd_phase(cfg, tokenizer), int(saved.get("rows_per_shard", 1)))
    changed = differences(saved, expected)
    if changed:
        raise ConfigError(
            f"{where} is stale, it was written for other settings ({'; '.join(changed)}); rewrite it with "
            "python -m train.teacher_cache <this run's overrides> into another directory, or point kd.teacher_cache "
            "at a cache of this data and teacher"
        )
    needed = expected["positions"]
    shards = -(-min(needed, saved["positions"]) // expected["rows_per_shard"])
    missing = [s for s in range(shards) if shard_rows(path, s) is None]
    if saved["positions"] < needed or missing:
        have = f"shards {missing[:5]} are missing" if missing else f"it covers {saved['positions']} stream rows"
        raise ConfigError(
            f"{where} is incomplete for this run: {have}, the kd stage reads {needed} (kd.max_steps x "
            "accumulate_grad_batches x micro_batch_size x world size); run python -m train.teacher_cache with this "
            "run's overrides to finish it"
        )
    return TeacherCache(path, saved)


def cache_settings(cfg: TrainConfig) -> dict[str, Any] | None:
    """What a rerun of the kd stage compares about its cache (train/runtime/rerun.py): the manifest's MATCH keys."""
    saved = read_manifest(cfg.kd.teacher_cache) if cfg.kd.teacher_cache else None
    return None if saved is None else {k: saved.get(k) for k in MATCH}
