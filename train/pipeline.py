"""The stage pipeline: `run(cfg)` executes `cfg.stages` in order, each in its folder under `output_dir`.

A stage is finished once its `done.json` exists (written last, atomically); rerunning the same command
skips finished stages and resumes an interrupted training stage from its last checkpoint (optimizer,
scheduler, data position and step come back with it). Students pass between stages as Hugging Face
directories (`<stage>/student`), so any stage's output can be inspected or loaded on its own. The stages
themselves live in train/stages/ (one file each, listed in its registry).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from transformers import AutoTokenizer

from models.compile import set_compile
from train.config import TrainConfig, typed_config
from train.runtime.faults import Preempted
from train.runtime.memory_preflight import check_memory
from train.runtime.preemption import take_late_signal
from train.runtime.ranks import is_rank_zero, wait_for_file
from train.runtime.rerun import check_rerun, record_stage_settings, restart, wait_for_restart
from train.runtime.run_lock import RunLock
from train.runtime.teacher_cache import open_teacher_cache
from train.runtime.teachers import resolve_teacher
from train.runtime.tracking import Tracker
from train.stages import stage
from train.stages.context import Context, initialized_student_dir, write_json

__all__ = ["Context", "initialized_student_dir", "run"]

log = logging.getLogger(__name__)


def run(cfg: Any, callbacks: dict[str, list] | None = None) -> dict:
    """Run the configured stages; returns the report. `cfg`: the composed config or a TrainConfig;
    `callbacks`: extra Lightning callbacks per stage."""
    cfg = typed_config(cfg)
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # One run per output_dir (train/runtime/run_lock.py): rank 0 holds the lock; the run's other ranks share it.
    with RunLock(out) if is_rank_zero() else contextlib.nullcontext():
        # What the folder holds must be what this config continues (train/runtime/rerun.py), checked before
        # anything loads; restart_from moves the stages it redoes aside.
        check_rerun(cfg, out)
        # Will the training stages fit the GPU (train/runtime/memory_preflight.py)? Before any weights load.
        check_memory(cfg)
        restart(cfg, out) if is_rank_zero() else wait_for_restart(cfg, out)
        return _run(cfg, out, callbacks or {})


def _run(cfg: TrainConfig, out: Path, callbacks: dict[str, list]) -> dict:
    L.seed_everything(cfg.seed, workers=True)
    set_compile(cfg.student.compile)  # CUDA training steps only (models/compile.py)
    ctx = _load(cfg, out, callbacks)
    if "kd" in cfg.stages and cfg.kd.teacher_cache and not (ctx.stage_dir("kd") / "done.json").exists():
        open_teacher_cache(cfg, ctx.tokenizer)  # a stale or incomplete cache stops the run before any stage trains
    report = ctx.report
    take_late_signal()  # a signal left by an earlier run in this process (one that failed after a fit) is not ours
    # Which stages are finished, read once: every rank must walk the same stages (each does one collective per stage
    # below), and rank 0 may finish a quick stage before another rank would look at its done.json.
    finished = {name for name in cfg.stages if (ctx.stage_dir(name) / "done.json").exists()}
    # One W&B run for all stages (resumed by a rerun), finished when the block ends; a no-op for other loggers.
    with Tracker.start(cfg, out) as tracker:
        for index, name in enumerate(cfg.stages):
            if name in finished:
                log.info("stage %s: finished earlier, skipped", name)
                continue
            _run_stage(ctx, name, index, report, tracker)
            _stop_if_signalled_late(name, cfg.stages[index + 1 :])
        tracker.pipeline_done(report)
    return report


def _run_stage(ctx: Context, name: str, index: int, report: dict, tracker: Tracker) -> None:
    """One stage on this rank: rank 0 runs it (with the others, if it trains), saves it and marks it done; the
    others train collectively where it trains and wait for rank 0's done.json."""
    cfg, done = ctx.cfg, ctx.stage_dir(name) / "done.json"
    if not is_rank_zero() and not stage(name).trains:
        wait_for_file(done, f"stage {name}")  # rank 0's work (train/runtime/ranks.py)
        return
    ctx.stage_dir(name).mkdir(parents=True, exist_ok=True)
    if is_rank_zero():
        record_stage_settings(cfg, ctx.stage_dir(name), name)
    # Each stage starts from its own seed, so its result does not depend on which stages ran in this
    # process (a cached tiny teacher, a skipped stage, a resumed run).
    L.seed_everything(cfg.seed + index, workers=True)
    start = time.perf_counter()
    log.info("stage %s: start", name)
    result = stage(name).run(ctx)
    if not is_rank_zero():  # trained collectively; rank 0 saves the student and marks the stage done
        wait_for_file(done, f"saving stage {name}")
        return
    seconds = time.perf_counter() - start
    report["stage_seconds"][name] = round(seconds, 1)
    write_json(done, {"seconds": seconds, **result})
    write_json(ctx.out / "report.json", report)
    tracker.stage_done(name, report)


def _stop_if_signalled_late(name: str, remaining: list[str]) -> None:
    """A SIGTERM / SIGUSR1 that reached the stage after its last training step: the stage is finished and saved,
    so stop here, before the next one starts (train/runtime/preemption.py). Every rank agrees, as for a step."""
    signum = take_late_signal() or 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([signum], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        signum = int(flag.item())
    if signum and remaining:
        signame = signal.Signals(signum).name
        raise Preempted(
            f"stage {name}: finished, then stopped by {signame} (received after its last step) before stage "
            f"{remaining[0]}. Rerun the same command to resume",
            signum,
        )


def _load(cfg: TrainConfig, out: Path, callbacks: dict[str, list]) -> Context:
    """The teacher as a loadable directory (trained first when it is the tiny one; a GGUF teacher dequantized once
    into a cached Hugging Face directory: rank 0 writes, the others wait), its tokenizer and the report so far. The
    stages load the teachers' weights on first use (train/stages/context.py)."""
    teacher_path = resolve_teacher(cfg.teacher.name_or_path, cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer or teacher_path, trust_remote_code=False)
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {"stage_seconds": {}}
    report.update({"teacher": teacher_path, "output_dir": str(out)})
    if cfg.kd.teacher_name_or_path is not None:
        report["kd_teacher"] = cfg.kd.teacher_name_or_path
    return Context(cfg, out, teacher_path, tokenizer, report, callbacks)
