"""What every stage gets: the run's typed config, the loaded teacher and tokenizer, the report, and the few things
stages share (where a stage's folder and the latest student are, saving and loading students, fitting a
LightningModule with resume, the trained weights out of DeepSpeed)."""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from data.config import DataConfig
from data.datamodule import DistillDataModule
from models import HybridForCausalLM
from models.teachers import TeacherSpec, describe_teacher, load_teacher_config
from train.config import ConfigError, TrainConfig
from train.config.tokenizers import check_same_tokenizer, load_tokenizer
from train.runtime.deepspeed_strategy import consolidated_state_dict, is_deepspeed, load_consolidated
from train.runtime.faults import CheckpointError, FaultError
from train.runtime.teachers import kd_teacher_dtype, load_resolved, resolve_teacher, separate_kd_teacher
from train.runtime.trainer import make_trainer

from . import STUDENT_STAGES

log = logging.getLogger(__name__)


@dataclass
class Context:
    cfg: TrainConfig
    out: Path
    teacher_path: str  # teacher.name_or_path resolved to a Hugging Face directory or Hub id
    tokenizer: PreTrainedTokenizerBase
    report: dict = field(default_factory=dict)
    callbacks: dict[str, list] = field(default_factory=dict)  # extra Lightning callbacks per stage (tests, tools)
    _loaded: dict[str, tuple[PreTrainedModel, TeacherSpec]] = field(default_factory=dict, repr=False)

    @property
    def data_cfg(self) -> DataConfig:
        return self.cfg.data

    @property
    def teacher(self) -> PreTrainedModel:
        """`teacher.*`, loaded on first use."""
        if "teacher" not in self._loaded:
            cfg = self.cfg
            self._loaded["teacher"] = load_resolved(
                self.teacher_path, cfg.teacher.name_or_path, cfg.teacher.dtype, cfg, cfg.teacher.rope_scaling.as_dict()
            )
        return self._loaded["teacher"][0]

    @property
    def spec(self) -> TeacherSpec:
        """`teacher.*`'s shapes, from its config alone when its weights are not loaded (select needs no weights)."""
        if "teacher" in self._loaded:
            return self._loaded["teacher"][1]
        teacher = self.cfg.teacher
        return describe_teacher(
            load_teacher_config(self.teacher_path, teacher.trust_remote_code, teacher.rope_scaling.as_dict())
        )

    def kd_teacher(self, keep_teacher: bool = False) -> PreTrainedModel:
        """The teacher KD distills from: `teacher.*`, or the separate kd.teacher_name_or_path, whose tokenizer is
        checked against the data's before its weights load. Unless `keep_teacher`, the `teacher.*` model is released
        first, so that the two are not both held."""
        if not separate_kd_teacher(self.cfg):
            return self.teacher
        if "kd" not in self._loaded:
            if not keep_teacher and self._loaded.pop("teacher", None) is not None:
                gc.collect()
                torch.cuda.empty_cache()
            name = self.cfg.kd.teacher_name_or_path
            path = resolve_teacher(name, self.cfg)
            check_same_tokenizer(self.tokenizer, load_tokenizer(path), self.cfg.teacher.name_or_path, name)
            model, spec = load_resolved(path, name, kd_teacher_dtype(self.cfg), self.cfg)
            if spec.vocab_size < len(self.tokenizer):
                raise ConfigError(
                    f"kd.teacher_name_or_path={name!r} has {spec.vocab_size} embedding rows, fewer than the "
                    f"{len(self.tokenizer)} ids of the data's tokenizer"
                )
            log.info("KD teacher %s: %d vocabulary rows (student: the teacher's %d)", name, spec.vocab_size,
                     self.spec.vocab_size)  # fmt: skip
            self._loaded["kd"] = (model, spec)
        return self._loaded["kd"][0]

    def stage_dir(self, stage: str) -> Path:
        return self.out / stage

    def latest_student_dir(self) -> Path:
        """The student of the last stage that made one (the registry says which stages do)."""
        for stage in reversed(STUDENT_STAGES):
            path = self.stage_dir(stage) / "student"
            if (path / "config.json").exists():
                return path
        raise FileNotFoundError(f"no student under {self.out}: run the init stage first")

    def load_student(self, path: Path) -> HybridForCausalLM:
        """A saved student, fp32, masking packed documents as this run's student.document_masking says."""
        return load_student(path, document_masking=self.cfg.student.document_masking)

    def save_student(self, student: HybridForCausalLM, path: Path, dtype: torch.dtype | None = None) -> None:
        save_student(student, path, self.tokenizer, dtype)

    def fit(
        self,
        stage: str,
        module: L.LightningModule,
        phase: str | None,
        loaders: dict | None = None,
        datamodule: DistillDataModule | None = None,
    ) -> L.Trainer:
        """Train one stage (resuming from its last checkpoint); `phase` picks the distillation stream (`datamodule`
        one built for it), or `loaders` (train/val DataLoaders) give another one (DPO's preference pairs)."""
        schedule = getattr(self.cfg, stage)
        folder = self.stage_dir(stage)
        trainer, _ = make_trainer(
            asdict(self.cfg.trainer),
            asdict(self.cfg.strategy),
            asdict(self.cfg.logger),
            folder,
            self.cfg.run_name,
            schedule.max_steps,
            schedule.val_every_n_steps,
            schedule.checkpoint_every_n_steps,
            self.cfg.eval.max_batches,
            self.callbacks.get(stage),
            faults=asdict(self.cfg.faults),
        )
        last = folder / "checkpoints" / "last.ckpt"
        resume = str(last) if last.exists() else None
        if resume:
            log.info("stage %s: resuming from %s", stage, last)
        if phase is not None:
            datamodule = datamodule or DistillDataModule(self.data_cfg, self.tokenizer, phase=phase)
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
        else:
            trainer.fit(module, loaders["train"], loaders["val"], ckpt_path=resume)
        if getattr(module, "teacher_engine", None) is not None:
            # teacher.shard: its weights are ZeRO-3 slices now; a later user (eval, ILD's held-out losses, on rank 0
            # alone) loads it whole again.
            self._loaded = {key: held for key, held in self._loaded.items() if held[0] is not module.teacher}
        if trainer.interrupted or trainer.global_step < schedule.max_steps:
            # Lightning returns normally after Ctrl-C or SIGTERM; the stage is not finished and must not count as done.
            raise FaultError(
                f"stage {stage} stopped at step {trainer.global_step} of {schedule.max_steps}; "
                f"rerun the same command to resume from {last}"
            )
        return trainer

    def trained_student(
        self, stage: str, trainer: L.Trainer, live: HybridForCausalLM, prefix: str, source: Path
    ) -> HybridForCausalLM:
        """The trained student in fp32 on rank 0: the live module, or under DeepSpeed the consolidated fp32 master
        weights of the stage's final checkpoint (ZeRO keeps bf16 or partitioned copies in the module)."""
        if not is_deepspeed(trainer.strategy):
            return live
        student = self.load_student(source)
        checkpoint = self.stage_dir(stage) / "checkpoints" / "last.ckpt"
        load_consolidated(student, consolidated_state_dict(checkpoint, prefix))
        return student


def initialized_student_dir(out: Path) -> Path:
    """The student before any training: composed from the init candidates by `select`, else init's own."""
    composed = out / "select" / "initialized_student"
    return composed if composed.exists() else out / "init" / "student"


def write_json(path: Path, payload: Any) -> None:
    """Atomic JSON write (tmp + rename). NaN / inf become null: bare NaN is not JSON, and other tools reading the
    report (jq, a browser, json.loads with strict parsers) would refuse the whole file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_finite(payload), indent=2, default=str, allow_nan=False))
    os.replace(tmp, path)


def _finite(node: Any) -> Any:
    if isinstance(node, float) and not math.isfinite(node):
        return None
    if isinstance(node, dict):
        return {key: _finite(value) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return [_finite(value) for value in node]
    return node


def load_student(
    path: Path, dtype: torch.dtype | None = None, document_masking: str | None = None
) -> HybridForCausalLM:
    """A student a stage saved; a damaged or missing one is a CheckpointError (exit 4) naming the stage that made
    it and how to redo that stage. `document_masking` (student.document_masking) replaces the saved one: how packed
    documents are masked is a choice of the run, not of the weights."""
    overrides = {} if document_masking is None else {"document_masking": document_masking}
    try:
        return HybridForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **overrides)
    except Exception as error:  # safetensors, JSON, OSError: the student's files are not what save_student wrote
        stage = Path(path).parent.name if Path(path).name == "student" else Path(path).parent.parent.name
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise CheckpointError(
            f"the student saved by stage {stage} ({path}) cannot be read: {type(error).__name__}: {reason}; "
            f"restore it, or redo that stage and the ones after it with restart_from={stage}"
        ) from error


def save_student(
    student: HybridForCausalLM, path: Path, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype | None = None
) -> None:
    """Atomic: written to `<path>.tmp`, then renamed over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    model = student if dtype is None else student.to(dtype)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if path.exists():  # a rerun of a stage that crashed after saving: replace, never merge
        shutil.rmtree(path)
    os.replace(tmp, path)
