"""The run's teachers as files and models: `teacher.*` (init, ILD, select, eval) and, when set, the separate KD
teacher `kd.teacher_name_or_path` (kd, eval). Resolving makes a loadable Hugging Face directory (the tiny teacher
trained, a GGUF dequantized once into a cache: rank 0 writes, the other ranks wait); loading reads the weights, which
the stages do on first use, so a stage that needs one teacher never holds two."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from models.gguf import find_gguf, gguf_cache_dir
from models.teachers import TeacherLoadError, TeacherSpec, load_teacher, resolve_teacher_path
from models.teachers.loading import resolve_attn_implementation
from train.config import TINY_TEACHER, TrainConfig

from .ranks import is_rank_zero, wait_for_file
from .tiny_teacher import ensure_tiny_teacher, tiny_teacher_dir


def resolve_teacher(name: str, cfg: TrainConfig) -> str:
    """A Hugging Face directory or Hub id for `name` (teacher.name_or_path or kd.teacher_name_or_path)."""
    if name == TINY_TEACHER:
        if not is_rank_zero():
            wait_for_file(tiny_teacher_dir(asdict(cfg.teacher.tiny), cfg.data) / "config.json", "the tiny teacher")
        return str(ensure_tiny_teacher(asdict(cfg.teacher.tiny), cfg.data, cfg.seed))
    gguf = find_gguf(name)
    if gguf is not None and not is_rank_zero():
        wait_for_file(gguf_cache_dir(gguf) / "config.json", "the GGUF teacher")
    return resolve_teacher_path(name)


def load_resolved(
    path: str, source: str, dtype: str, cfg: TrainConfig, rope_scaling: dict | None = None
) -> tuple[Any, TeacherSpec]:
    """The frozen teacher at `path` (from `resolve_teacher(source)`), with the settings of `teacher.*`;
    `rope_scaling`: teacher.rope_scaling for `teacher.*` itself (a separate KD teacher keeps its own RoPE)."""
    try:
        return load_teacher(
            path,
            dtype=dtype,
            trust_remote_code=cfg.teacher.trust_remote_code,
            # auto: FlexAttention when the run trains on CUDA (a CPU run on a GPU machine keeps SDPA)
            attn_implementation=resolve_attn_implementation(
                cfg.teacher.attn_implementation, cuda=torch.cuda.is_available() and cfg.trainer.accelerator != "cpu"
            ),
            rope_scaling=rope_scaling,
        )
    except TeacherLoadError as error:
        gguf = find_gguf(source)
        if gguf is None:
            raise
        raise TeacherLoadError(f"{error} (the dequantized copy of {gguf}; the .gguf file itself is damaged)") from error


def kd_teacher_dtype(cfg: TrainConfig) -> str:
    return cfg.kd.teacher_dtype or cfg.teacher.dtype


def separate_kd_teacher(cfg: TrainConfig) -> bool:
    """Whether KD distills from a teacher other than `teacher.*`."""
    kd = cfg.kd
    return kd.teacher_name_or_path is not None and (
        kd.teacher_name_or_path != cfg.teacher.name_or_path or kd_teacher_dtype(cfg) != cfg.teacher.dtype
    )
