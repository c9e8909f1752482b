"""The stage pipeline: `run(cfg)` executes `cfg.stages` in order, each in its folder under `output_dir`.

A stage is finished once its `done.json` exists (written last, atomically); rerunning the same command
skips finished stages and resumes an interrupted training stage from its last checkpoint (optimizer,
scheduler, data position and step come back with it). Students pass between stages as Hugging Face
directories (`<stage>/student`), so any stage's output can be inspected or loaded on its own.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from data.config import DataConfig
from data.datamodule import DistillDataModule
from models import HybridForCausalLM, student_cache_bytes, teacher_cache_bytes
from models.init import convert_teacher
from models.teacher import TeacherSpec, load_teacher

from .config import student_init_kwargs
from .evaluate import heldout_loss
from .ild import ILDModule, compose_student
from .kd import KDModule
from .losses import KDLossConfig
from .plots import plot_ild_layers, plot_losses
from .tiny_teacher import ensure_tiny_teacher
from .trainer import make_trainer

log = logging.getLogger(__name__)
TRAINING_STAGES = ("ild", "kd")
NOT_YET = ("select", "dpo")


@dataclass
class Context:
    cfg: DictConfig
    out: Path
    teacher: PreTrainedModel
    spec: TeacherSpec
    teacher_path: str
    tokenizer: PreTrainedTokenizerBase
    data_cfg: DataConfig
    report: dict = field(default_factory=dict)
    callbacks: dict[str, list] = field(default_factory=dict)  # extra Lightning callbacks per stage (tests, tools)

    def stage_dir(self, stage: str) -> Path:
        return self.out / stage

    def latest_student_dir(self) -> Path:
        for stage in ("kd", "ild", "init"):
            path = self.stage_dir(stage) / "student"
            if (path / "config.json").exists():
                return path
        raise FileNotFoundError(f"no student under {self.out}: run the init stage first")


def write_json(path: Path, payload: Any) -> None:
    """Atomic JSON write (tmp + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def run(cfg: DictConfig, callbacks: dict[str, list] | None = None) -> dict:
    """Run the configured stages; returns the report. `callbacks`: extra Lightning callbacks per stage."""
    stages = list(cfg.stages)
    unavailable = [s for s in stages if s in NOT_YET]
    if unavailable:
        raise ValueError(f"stages {unavailable} are not available yet; available: init, ild, kd, eval, export")
    if cfg.kd.get("teacher_name_or_path"):
        raise ValueError("kd.teacher_name_or_path (a separate, larger KD teacher) is not supported yet: set it to null")
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    data_cfg = DataConfig.from_dict(_container(cfg.data))
    teacher_path = str(cfg.teacher.name_or_path)
    if teacher_path == "tiny":
        teacher_path = str(ensure_tiny_teacher(_container(cfg.teacher.tiny), data_cfg, cfg.seed))
    teacher, spec = load_teacher(
        teacher_path,
        dtype=cfg.teacher.dtype,
        trust_remote_code=cfg.teacher.trust_remote_code,
        attn_implementation=cfg.teacher.attn_implementation,
    )
    tokenizer = AutoTokenizer.from_pretrained(data_cfg.tokenizer or teacher_path, trust_remote_code=False)
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {"stage_seconds": {}}
    report.update({"teacher": teacher_path, "output_dir": str(out)})
    ctx = Context(cfg, out, teacher, spec, teacher_path, tokenizer, data_cfg, report, callbacks or {})
    for stage in stages:
        done = ctx.stage_dir(stage) / "done.json"
        if done.exists():
            log.info("stage %s: finished earlier, skipped", stage)
            continue
        ctx.stage_dir(stage).mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        log.info("stage %s: start", stage)
        result = STAGES[stage](ctx) or {}
        seconds = time.perf_counter() - start
        report["stage_seconds"][stage] = round(seconds, 1)
        write_json(done, {"seconds": seconds, **result})
        write_json(report_path, report)
    return report


# --- stages ---------------------------------------------------------------------------------------------


def _wants_candidates(cfg: DictConfig) -> bool:
    mode = cfg.ild.get("candidates", "auto")
    return mode == "both" or (mode == "auto" and "select" in cfg.stages)


def stage_init(ctx: Context) -> dict:
    kwargs = student_init_kwargs(ctx.cfg.student)
    student, report = convert_teacher(ctx.teacher, ctx.spec, **kwargs)
    print(report.table())
    folder = ctx.stage_dir("init")
    report.to_json(folder / "init_report.json")
    _save_student(student, folder / "student", ctx.tokenizer)
    if _wants_candidates(ctx.cfg):
        for kind, layers in (("mla", "all"), ("mamba", "none")):
            candidate, _ = convert_teacher(ctx.teacher, ctx.spec, **{**kwargs, "mla_layers": layers})
            _save_student(candidate, folder / "candidates" / kind, ctx.tokenizer)
    ctx.report["init"] = {"student_params": report.student_params, "teacher_params": report.teacher_params}
    return {"mixer_types": student.config.mixer_types}


def _optim(stage_cfg: DictConfig) -> dict:
    return {k: stage_cfg[k] for k in ("lr", "weight_decay", "warmup_steps", "max_steps", "min_lr_ratio")}


def _fit(ctx: Context, stage: str, module: L.LightningModule, phase: str) -> L.Trainer:
    stage_cfg = ctx.cfg[stage]
    folder = ctx.stage_dir(stage)
    trainer, checkpoint = make_trainer(
        _container(ctx.cfg.trainer),
        _container(ctx.cfg.strategy),
        _container(ctx.cfg.logger),
        folder,
        ctx.cfg.run_name,
        stage_cfg.max_steps,
        stage_cfg.val_every_n_steps,
        stage_cfg.checkpoint_every_n_steps,
        ctx.cfg.eval.max_batches,
        ctx.callbacks.get(stage),
    )
    data = DistillDataModule(ctx.data_cfg, ctx.tokenizer, phase=phase)
    last = folder / "checkpoints" / "last.ckpt"
    if last.exists():
        log.info("stage %s: resuming from %s", stage, last)
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if last.exists() else None)
    if trainer.interrupted or trainer.global_step < stage_cfg.max_steps:
        # Lightning returns normally after Ctrl-C or SIGTERM; the stage is not finished and must not count as done.
        raise RuntimeError(
            f"stage {stage} stopped at step {trainer.global_step} of {stage_cfg.max_steps}; "
            f"rerun the same command to resume from {last}"
        )
    return trainer


def _load_student(path: Path, dtype: torch.dtype | None = None) -> HybridForCausalLM:
    return HybridForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)


def _save_student(student: HybridForCausalLM, path: Path, tokenizer: PreTrainedTokenizerBase, dtype=None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    model = student if dtype is None else student.to(dtype)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)


def stage_ild(ctx: Context) -> dict:
    init = ctx.stage_dir("init")
    candidates = init / "candidates"
    if _wants_candidates(ctx.cfg) and candidates.exists():
        students = {kind: _load_student(candidates / kind) for kind in ("mla", "mamba")}
    else:
        students = {"assigned": _load_student(init / "student")}
    c = ctx.cfg.ild
    module = ILDModule(students, ctx.teacher, _optim(c), c.loss, c.output_weight, c.mixer_weight, c.trainable)
    trainer = _fit(ctx, "ild", module, "ild")
    # Per-layer losses of every candidate on held-out data (the input to layer selection).
    metrics = trainer.validate(module, datamodule=DistillDataModule(ctx.data_cfg, ctx.tokenizer, "ild"), verbose=False)[
        0
    ]
    layer_losses: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key.startswith("val/ild/"):
            _, _, name, layer = key.split("/")
            layer_losses.setdefault(layer.removeprefix("layer_"), {})[name] = float(value)
    write_json(ctx.stage_dir("ild") / "layer_losses.json", layer_losses)
    mixer_types = _load_student(init / "student").config.mixer_types
    student = (
        compose_student(module.students, mixer_types)
        if "assigned" not in module.students
        else module.students["assigned"]
    )
    _save_student(student, ctx.stage_dir("ild") / "student", ctx.tokenizer)
    if "assigned" not in module.students:
        for kind, candidate in module.students.items():
            _save_student(candidate, ctx.stage_dir("ild") / "candidates" / kind, ctx.tokenizer)
    plot_ild_layers(layer_losses, ctx.out / "ild_layer_losses.png")
    ctx.report["ild"] = {"tokens_seen": module.tokens_seen, "layer_losses": layer_losses}
    return {"tokens_seen": module.tokens_seen}


def stage_kd(ctx: Context) -> dict:
    student = _load_student(ctx.latest_student_dir())
    if ctx.cfg.student.get("gradient_checkpointing", False):
        student.gradient_checkpointing_enable()
    c = ctx.cfg.kd
    loss = KDLossConfig(
        divergence=c.divergence,
        jsd_beta=c.jsd_beta,
        temperature=c.temperature,
        kl_weight=c.kl_weight,
        ce_weight=c.ce_weight,
        chunk_tokens=c.chunk_tokens,
    )
    module = KDModule(student, ctx.teacher, _optim(c), loss)
    _fit(ctx, "kd", module, "kd")
    _save_student(module.student, ctx.stage_dir("kd") / "student", ctx.tokenizer)
    ctx.report["kd"] = {"tokens_seen": module.tokens_seen}
    return {"tokens_seen": module.tokens_seen}


def stage_eval(ctx: Context) -> dict:
    data = DistillDataModule(ctx.data_cfg, ctx.tokenizer, phase="kd")
    data.setup()
    loader = data.val_dataloader()
    max_batches = ctx.cfg.eval.max_batches
    rows = {"teacher": heldout_loss(ctx.teacher, loader, max_batches)}
    rows["teacher"]["params"] = sum(p.numel() for p in ctx.teacher.parameters())
    rows["teacher"]["kv_bytes_per_token"] = teacher_cache_bytes(
        ctx.spec.num_layers, ctx.spec.num_kv_heads, ctx.spec.head_dim
    ).per_token
    candidates = [
        ("initialized student", ctx.stage_dir("init") / "student"),
        ("final student", ctx.latest_student_dir()),
    ]
    for name, path in candidates:
        if not (path / "config.json").exists():
            continue
        student = _load_student(path)
        rows[name] = heldout_loss(student, loader, max_batches)
        rows[name]["params"] = sum(p.numel() for p in student.parameters())
        rows[name]["kv_bytes_per_token"] = student_cache_bytes(student.config).per_token
    ctx.report["eval"] = rows
    ctx.report["tokens_seen"] = sum(ctx.report.get(s, {}).get("tokens_seen", 0) for s in TRAINING_STAGES)
    print(summary_table(rows))
    plot_losses(ctx.out, ctx.out / "loss_curves.png")
    return {}


def stage_export(ctx: Context) -> dict:
    dtype = getattr(torch, ctx.cfg.export.dtype)
    student = _load_student(ctx.latest_student_dir())
    _save_student(student, ctx.out / "student", ctx.tokenizer, dtype=dtype)
    ctx.report["export"] = {"path": str(ctx.out / "student"), "dtype": ctx.cfg.export.dtype}
    return {}


def summary_table(rows: dict[str, dict]) -> str:
    lines = [f"{'model':<20} {'held-out loss':>13} {'perplexity':>10} {'KV B/token':>10} {'params':>12}"]
    for name, row in rows.items():
        lines.append(
            f"{name:<20} {row['loss']:>13.4f} {row['perplexity']:>10.2f} {row['kv_bytes_per_token']:>10} "
            f"{row['params']:>12,}"
        )
    return "\n".join(lines)


STAGES = {"init": stage_init, "ild": stage_ild, "kd": stage_kd, "eval": stage_eval, "export": stage_export}
