"""`python -m train.teacher_cache [--rows-per-shard=N] <the overrides of python -m train>`: offline KD's first half.

Runs the KD teacher (kd.teacher_name_or_path, else teacher.*) once over the KD stream, in stream order, for the
positions the kd stage will read (kd.max_steps x accumulate_grad_batches x micro_batch_size x world size), and
writes its top-k log-probs per token (kd.teacher_cache_k, kd.teacher_cache_dtype, at kd.temperature) into
kd.teacher_cache (format: train/runtime/teacher_cache.py). `python -m train <same overrides>` then distills from the
files without loading the teacher.

A command rather than a stage of the registry: a stage belongs to one output_dir and hands a student on, while the
cache belongs to the data and the teacher; one cache serves every student (layer maps, ranks, ablations) distilled on
that stream. Rerunning skips finished shards (resume); under torchrun each process writes the shards s with
s % WORLD_SIZE == RANK. Errors end in one line and exit 2, as `python -m train`'s do.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from data.batch import collate_rows
from data.order import StreamDataset
from models.teachers import adapter_for
from train.config import ConfigError, TrainConfig, compose_config, validate_config
from train.losses import teacher_topk
from train.runtime.ranks import process_rank
from train.runtime.teacher_cache import (
    FILES,
    differences,
    expected_manifest,
    kd_phase,
    read_manifest,
    shard_rows,
    write_manifest,
    write_shard,
)
from train.runtime.teachers import resolve_teacher
from train.stages.context import Context

log = logging.getLogger(__name__)
ROWS_PER_SHARD = 256  # stream rows per shard: ~270 MB at seq_len 2048, k 64, fp32 log-probs
TOKENS_PER_CHUNK = 4096  # teacher logits (n, V) in fp32 at a time: 2 GB at V = 128256


def write_cache(cfg: TrainConfig, rows_per_shard: int = ROWS_PER_SHARD) -> Path:
    """Write (or finish) the cache kd.teacher_cache for this config; returns its path."""
    if not cfg.kd.teacher_cache:
        raise ConfigError("kd.teacher_cache=None is invalid here; allowed: the directory to write the cache into")
    path = Path(cfg.kd.teacher_cache)
    teacher_path = resolve_teacher(cfg.teacher.name_or_path, cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer or teacher_path, trust_remote_code=False)
    data = kd_phase(cfg, tokenizer)
    manifest = expected_manifest(cfg, data, rows_per_shard)
    saved = read_manifest(path)
    if saved is not None:
        if changed := differences(saved, manifest):
            raise ConfigError(
                f"kd.teacher_cache={str(path)!r} holds a cache of other settings ({'; '.join(changed)}); choose "
                "another directory, or delete that one"
            )
        manifest["rows_per_shard"] = rows_per_shard = saved["rows_per_shard"]  # its shards' layout stays
        manifest["positions"] = max(manifest["positions"], saved["positions"])
    if process_rank() == 0:
        write_manifest(path, manifest)
    ctx = Context(cfg, path, teacher_path, tokenizer)
    k, total = manifest["k"], manifest["positions"]
    vocab = ctx.spec.vocab_size  # the student's rows (a KD teacher's padded rows past them are never targets)
    if not 1 <= k <= vocab:
        raise ConfigError(f"kd.teacher_cache_k={k} is invalid; allowed: 1 to the vocabulary size {vocab}")
    rank, world = process_rank(), int(os.environ.get("WORLD_SIZE", "1"))
    todo = [
        s
        for s in range(rank, -(-total // rows_per_shard), world)
        if shard_rows(path, s) != min(rows_per_shard, total - s * rows_per_shard)
    ]
    log.info("teacher cache %s: %d stream rows, k=%d, %d shards to write on rank %d", path, total, k, len(todo), rank)
    if not todo:
        return path
    teacher = ctx.kd_teacher()
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu")
    teacher.to(device).eval()
    head = adapter_for(teacher).lm_head(teacher).weight[:vocab]
    stream = StreamDataset(data.rows, cfg.data.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    store = np.float16 if manifest["dtype"] == "float16" else np.float32
    for shard in todo:
        first = shard * rows_per_shard
        n = min(rows_per_shard, total - first)
        out = {
            "ids": np.empty((n, data.seq_len, k), np.int32),
            "logp": np.empty((n, data.seq_len, k), store),
            "rest": np.empty((n, data.seq_len), np.float32),
        }
        for start in range(0, n, cfg.data.micro_batch_size):  # the training micro-batch: the same teacher numerics
            stop = min(n, start + cfg.data.micro_batch_size)
            batch = collate_rows(stream.__getitems__(list(range(first + start, first + stop))), data.seq_len, pad)
            for name, value in zip(FILES, _topk_rows(teacher, head, batch, k, cfg, device), strict=True):
                out[name][start:stop] = value
        write_shard(path, shard, out)
        log.info("teacher cache: shard %d (stream rows %d to %d) written", shard, first, first + n)
    return path


@torch.inference_mode()
def _topk_rows(teacher, head, batch, k: int, cfg: TrainConfig, device) -> tuple[np.ndarray, ...]:
    """The teacher's top-k of a collated batch: ids (b, T, k), log-probs (b, T, k), rest (b, T), as numpy."""
    batch = {key: value.to(device) for key, value in batch.items() if key != "stream_index"}
    hidden = adapter_for(teacher).final_hidden(teacher, batch)  # (b, T, D)
    b, t, d = hidden.shape
    flat = hidden.reshape(-1, d)
    parts = []
    for start in range(0, flat.shape[0], TOKENS_PER_CHUNK):
        # the matmul in the teacher's dtype as kd_loss does it; log-softmax and top-k in fp32 (train/losses/kd_topk.py)
        logits = F.linear(flat[start : start + TOKENS_PER_CHUNK], head.to(flat.dtype))
        parts.append(teacher_topk(logits, k, float(cfg.kd.temperature)))
    ids, logp, rest = (torch.cat(p) for p in zip(*parts, strict=True))
    if not bool(torch.isfinite(logp).all()):
        raise ValueError(f"the KD teacher gave non-finite logits in a batch of {b} stream rows; nothing was written")
    return (
        ids.reshape(b, t, k).cpu().numpy(),
        logp.reshape(b, t, k).float().cpu().numpy(),
        rest.reshape(b, t).float().cpu().numpy(),
    )


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from data.sources import DataSourceError
    from models.teachers import TeacherLoadError

    rows = [a.split("=", 1)[1] for a in argv if a.startswith("--rows-per-shard=")]
    overrides = [a for a in argv if not a.startswith("--rows-per-shard=")]
    try:
        if rows and not (rows[-1].isdigit() and int(rows[-1]) >= 1):
            raise ConfigError(f"--rows-per-shard={rows[-1]} is invalid; allowed: an integer >= 1")
        rows = int(rows[-1]) if rows else ROWS_PER_SHARD
        write_cache(validate_config(compose_config(overrides), fetch_teacher=True), rows)
    except (ConfigError, DataSourceError, TeacherLoadError, ValueError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
