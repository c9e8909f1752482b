"""Reruns into an existing output_dir: a stage continues only under the settings it started with.

Each stage writes `<stage>/settings.json` when it starts: every config value that can shape its result (the
teacher and its weight files, the student, the data, the trainer's numerics, its own group and those of the stages
before it, which stages ran before it), flattened to dotted keys. A rerun compares them before anything loads:

- equal: the stage is skipped when finished, resumed from its last checkpoint otherwise;
- different: the run stops with one line that names the changed keys and the two ways on: a new output_dir, or
  `restart_from=<stage>`, which moves that stage and every later one aside to `replaced/<time>/` and runs them
  again. The restart is recorded in `restart.json`, so rerunning the same command after a preemption resumes the
  restarted stage instead of restarting it once more.

Values that cannot change a finished result may differ (MAY_CHANGE: how the run is spread over devices, logged,
checkpointed and evaluated, and kernel choices that compute the same numbers).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from train.config import ConfigError, TrainConfig
from train.stages import STAGE_NAMES, STUDENT_STAGES, stage

log = logging.getLogger(__name__)

COMMON = ("seed", "teacher", "student", "data", "trainer")  # every stage's result depends on these groups
MAY_CHANGE = (
    "teacher.attn_implementation",  # the same attention, another backend
    "teacher.tiny.cache_dir",
    "teacher.trust_remote_code",
    "student.compile",
    "student.gradient_checkpointing",
    "student.document_masking",  # the same documents kept apart, another attention kernel
    "kd.use_triton",
    "kd.chunk_tokens",
    "data.num_workers",
    "data.pin_memory",
    "data.cache_dir",
    "data.num_proc",
    "data.eval_micro_batch_size",
    "data.eval_max_rows",
    "data.max_bad_fraction",  # a run that passed the check read the same rows
    "trainer.accelerator",
    "trainer.devices",  # resuming at another world size is supported (docs/reliability.md)
    "trainer.num_nodes",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.deterministic",
    "trainer.device_memory_gib",  # the memory pre-flight's capacity, not a numeric setting
)
MAY_CHANGE_SUFFIXES = (".val_every_n_steps", ".checkpoint_every_n_steps")
# Keys added after runs were recorded, with the value that reproduces what those runs did: a settings.json without
# the key compares as that value, so an older run resumes under its own behaviour (and a rerun with the new default
# names the key and the value to pass).
ADDED_KEYS = {
    "student.mamba.gate_init": "random",  # Mamba2's gate rows kept their random init
    "student.calibration_rows": 0,  # no calibration in the init stage
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
SETTINGS_FILE = "settings.json"
RESTART_FILE = "restart.json"


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat |= _flatten(value, f"{prefix}{key}.")
        return flat
    if isinstance(node, list):
        return {prefix[:-1]: [_finite(x) for x in node]}
    return {prefix[:-1]: _finite(node)}


def _finite(value: Any) -> Any:
    """inf / nan as text, so that a saved record (written as strict JSON) reads back equal."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in MAY_CHANGE) or key.endswith(MAY_CHANGE_SUFFIXES)


def teacher_files(name_or_path: str) -> dict[str, int]:
    """Weight files of a local teacher (a directory or one file) and their sizes: a swapped teacher behind the same
    path is a different teacher. Hub ids and the tiny teacher (keyed by its settings) give none."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return {path.name: path.stat().st_size}
    if path.is_dir():
        return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.name.endswith(WEIGHT_SUFFIXES)}
    return {}


def stage_settings(cfg: TrainConfig, name: str) -> dict[str, Any]:
    """What the result of stage `name` (one of cfg.stages) depends on, as dotted keys."""
    index = list(cfg.stages).index(name)
    groups = COMMON + tuple(g for s in cfg.stages[: index + 1] for g in stage(s).settings)
    flat = _flatten(json.loads(json.dumps(asdict(cfg), default=str)))
    settings = {k: v for k, v in flat.items() if k.split(".")[0] in groups and not _may_change(k)}
    settings["stages before it"] = list(cfg.stages[:index])
    settings["teacher weight files"] = teacher_files(cfg.teacher.name_or_path)
    if "kd" in groups and cfg.kd.teacher_name_or_path is not None:  # kd.* names it; its files say which one it is
        settings["kd teacher weight files"] = teacher_files(cfg.kd.teacher_name_or_path)
    if "kd" in groups and cfg.kd.teacher_cache is not None:  # the path names it; its manifest says what it holds
        from .teacher_cache import cache_settings

        settings["kd teacher cache"] = cache_settings(cfg)
    return settings


def record_stage_settings(cfg: TrainConfig, stage_dir: Path, name: str) -> None:
    """Write `<stage>/settings.json` when the stage starts (rank 0), unless a resumed stage has it already."""
    from train.stages.context import write_json

    path = stage_dir / SETTINGS_FILE
    if not path.exists():
        write_json(path, stage_settings(cfg, name))


def _changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = [k for k in dict.fromkeys([*current, *saved]) if not _may_change(k)]
    missing = object()
    saved = {**{k: v for k, v in ADDED_KEYS.items() if k in current}, **saved}
    return [
        f"{k}: {_show(saved.get(k, missing))} -> {_show(current.get(k, missing))}"
        for k in keys
        if saved.get(k, missing) != current.get(k, missing)
    ]


def _show(value: Any) -> str:
    return "(unset)" if not isinstance(value, (str, int, float, bool, list, dict, type(None))) else json.dumps(value)


def check_rerun(cfg: TrainConfig, out: Path) -> None:
    """Stop (ConfigError, one line) when this run cannot continue what `out` holds: a stage of it started there
    under other settings, or its first stage needs a student no earlier stage made. Changes nothing on disk."""
    check_student_source(cfg, out)
    pending = cfg.restart_from is not None and not _restart_recorded(cfg, out)
    for name in cfg.stages:
        if pending and STAGE_NAMES.index(name) >= STAGE_NAMES.index(cfg.restart_from):
            break  # about to be moved aside and redone
        path = out / name / SETTINGS_FILE
        if not path.exists():
            continue
        changes = _changes(json.loads(path.read_text()), stage_settings(cfg, name))
        if changes:
            shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
            raise ConfigError(
                f"stage {name} in {out} started with other settings ({shown}); to continue it, rerun with its "
                f"settings; to redo it and the stages after it, add restart_from={name}; or choose a new output_dir"
            )


def check_student_source(cfg: TrainConfig, out: Path) -> None:
    """A run whose first stage starts from a student needs an earlier stage's student in `out`: refuse before
    anything loads (`stages=[eval]` on a fresh folder)."""
    first = cfg.stages[0]
    if not stage(first).needs_student:
        return
    earlier = STUDENT_STAGES[: STUDENT_STAGES.index(first)] if first in STUDENT_STAGES else STUDENT_STAGES
    if not any((out / s / "done.json").exists() and (out / s / "student").is_dir() for s in earlier):
        raise ConfigError(
            f"stages={list(cfg.stages)}: {first} starts from a student, but no earlier stage "
            f"({', '.join(earlier)}) finished in {out}; add the stages before it, or point output_dir at a run "
            "that has them"
        )


def _restart_record(cfg: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps({"stage": cfg.restart_from, "settings": stage_settings(cfg, cfg.restart_from)}))


def _restart_recorded(cfg: TrainConfig, out: Path) -> bool:
    path = out / RESTART_FILE
    return path.exists() and json.loads(path.read_text()) == _restart_record(cfg)


def restart(cfg: TrainConfig, out: Path) -> None:
    """`restart_from=<stage>` (rank 0, after check_rerun): move that stage and every later one aside, once per
    settings."""
    name = cfg.restart_from
    if name is None:
        return
    if _restart_recorded(cfg, out):
        log.info("restart_from=%s: restarted earlier with these settings; continuing that run", name)
        return
    later = [s for s in STAGE_NAMES[STAGE_NAMES.index(name) :] if (out / s).exists()]
    aside = out / "replaced" / time.strftime("%Y%m%d-%H%M%S")
    for s in later:
        aside.mkdir(parents=True, exist_ok=True)
        os.replace(out / s, aside / s)
    if "export" in later and (out / "student").exists():
        os.replace(out / "student", aside / "student")
    if later:
        log.warning("restart_from=%s: moved %s aside to %s", name, ", ".join(later), aside)
    from train.stages.context import write_json

    write_json(out / RESTART_FILE, _restart_record(cfg))


def wait_for_restart(cfg: TrainConfig, out: Path, timeout_s: float = 3600.0) -> None:
    """Other ranks: wait until rank 0 has recorded this restart (and so moved the old stages aside)."""
    if cfg.restart_from is None:
        return
    start = time.monotonic()
    while not _restart_recorded(cfg, out):
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"waited {timeout_s:.0f} s for rank 0 to record restart_from={cfg.restart_from}")
        time.sleep(1.0)
