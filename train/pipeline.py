"""The stage pipeline: `run(cfg)` executes `cfg.stages` in order, each in its folder under `output_dir`.

A stage is finished once its `done.json` exists (written last, atomically); rerunning the same command
skips finished stages and resumes an interrupted training stage from its last checkpoint (optimizer,
scheduler, data position and step come back with it). Students pass between stages as Hugging Face
directories (`<stage>/student`), so any stage's output can be inspected or loaded on its own.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from data.config import DataConfig, SourceConfig
from data.datamodule import DistillDataModule
from data.preferences import collate_pairs, preference_splits
from models import HybridForCausalLM, student_cache_bytes, teacher_cache_bytes
from models.compile import set_compile
from models.gguf import find_gguf, gguf_cache_dir
from models.init import convert_teacher
from models.mixers import PLACED_KIND, candidate_kinds, mixer_map
from models.select import num_mla_for_budget, sensitivity_from_ild, smart_select, uniform_select
from models.teacher import TeacherSpec, load_teacher, resolve_teacher_path

from .config import student_init_kwargs
from .deepspeed_strategy import consolidated_state_dict, is_deepspeed, load_consolidated
from .dpo import DPOModule, preference_metrics
from .evaluate import eval_placement, heldout_agreement, heldout_loss, placed, side_by_side
from .faults import FaultError
from .ild import ILDModule, compose_student
from .kd import KDModule
from .losses import KDLossConfig
from .plots import plot_ild_layers, plot_losses, plot_selection
from .ranks import is_rank_zero, wait_for_file
from .tiny_teacher import ensure_tiny_teacher, tiny_teacher_dir
from .tracking import Tracker
from .trainer import make_trainer

log = logging.getLogger(__name__)
TRAINING_STAGES = ("ild", "kd", "dpo")


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
        for stage in ("dpo", "kd", "select", "ild", "init"):
            path = self.stage_dir(stage) / "student"
            if (path / "config.json").exists():
                return path
        raise FileNotFoundError(f"no student under {self.out}: run the init stage first")


def initialized_student_dir(out: Path) -> Path:
    """The student before any training: composed from the init candidates by `select`, else init's own."""
    composed = out / "select" / "initialized_student"
    return composed if composed.exists() else out / "init" / "student"


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
    if cfg.kd.get("teacher_name_or_path"):
        raise ValueError("kd.teacher_name_or_path (a separate, larger KD teacher) is not supported yet: set it to null")
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    set_compile(bool(cfg.student.get("compile", False)))  # CUDA training steps only (models/compile.py)
    data_cfg = DataConfig.from_dict(_container(cfg.data))
    teacher_path = str(cfg.teacher.name_or_path)
    if teacher_path == "tiny":
        tiny = _container(cfg.teacher.tiny)
        if not is_rank_zero():
            wait_for_file(tiny_teacher_dir(tiny, data_cfg) / "config.json", "the tiny teacher")
        teacher_path = str(ensure_tiny_teacher(tiny, data_cfg, cfg.seed))
    # A GGUF teacher becomes a Hugging Face directory once (cached; rank 0 writes it, the others wait for it); its
    # tokenizer is read from there too.
    gguf = find_gguf(teacher_path)
    if gguf is not None and not is_rank_zero():
        wait_for_file(gguf_cache_dir(gguf) / "config.json", "the GGUF teacher")
    teacher_path = resolve_teacher_path(teacher_path)
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
    # One W&B run for all stages (resumed by a rerun), finished when the block ends; a no-op for other loggers.
    with Tracker.start(cfg, out) as tracker:
        for index, stage in enumerate(stages):
            done = ctx.stage_dir(stage) / "done.json"
            if done.exists():
                log.info("stage %s: finished earlier, skipped", stage)
                continue
            if not is_rank_zero() and stage not in TRAINING_STAGES:
                wait_for_file(done, f"stage {stage}")  # rank 0's work (train/ranks.py)
                continue
            ctx.stage_dir(stage).mkdir(parents=True, exist_ok=True)
            # Each stage starts from its own seed, so its result does not depend on which stages ran in this
            # process (a cached tiny teacher, a skipped stage, a resumed run).
            L.seed_everything(cfg.seed + index, workers=True)
            start = time.perf_counter()
            log.info("stage %s: start", stage)
            result = STAGES[stage](ctx) or {}
            if not is_rank_zero():  # trained collectively; rank 0 saves the student and marks the stage done
                wait_for_file(done, f"saving stage {stage}")
                continue
            seconds = time.perf_counter() - start
            report["stage_seconds"][stage] = round(seconds, 1)
            write_json(done, {"seconds": seconds, **result})
            write_json(report_path, report)
            tracker.stage_done(stage, report)
        tracker.pipeline_done(report)
    return report


# --- stages ---------------------------------------------------------------------------------------------


def _wants_candidates(cfg: DictConfig) -> bool:
    mode = cfg.ild.get("candidates", "auto")
    return mode == "both" or (mode == "auto" and "select" in cfg.stages)


def stage_init(ctx: Context) -> dict:
    kwargs = student_init_kwargs(ctx.cfg.student)
    folder = ctx.stage_dir("init")
    if _wants_candidates(ctx.cfg):
        for kind in candidate_kinds():
            every_layer = {"mla_layers": None, "mixer_types": [kind] * ctx.spec.num_layers}
            candidate, report = convert_teacher(ctx.teacher, ctx.spec, **{**kwargs, **every_layer})
            report.to_json(folder / f"init_report_{kind}.json")
            _save_student(candidate, folder / "candidates" / kind, ctx.tokenizer)
    if kwargs["mla_layers"] == "smart":  # the map comes from the select stage
        return {}
    student, report = convert_teacher(ctx.teacher, ctx.spec, **kwargs)
    print(report.table())
    report.to_json(folder / "init_report.json")
    _save_student(student, folder / "student", ctx.tokenizer)
    ctx.report["init"] = {"student_params": report.student_params, "teacher_params": report.teacher_params}
    return {"mixer_types": student.config.mixer_types}


def _optim(stage_cfg: DictConfig) -> dict:
    return {k: stage_cfg[k] for k in ("lr", "weight_decay", "warmup_steps", "max_steps", "min_lr_ratio")}


def _fit(
    ctx: Context, stage: str, module: L.LightningModule, phase: str | None, loaders: dict | None = None
) -> L.Trainer:
    """Train one stage (resuming from its last checkpoint); `phase` picks the distillation stream, or
    `loaders` (train/val DataLoaders) give another one (DPO's preference pairs)."""
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
        faults=_container(ctx.cfg.faults) if "faults" in ctx.cfg else None,
    )
    data = DistillDataModule(ctx.data_cfg, ctx.tokenizer, phase=phase) if phase else None
    last = folder / "checkpoints" / "last.ckpt"
    if last.exists():
        log.info("stage %s: resuming from %s", stage, last)
    if data is not None:
        trainer.fit(module, datamodule=data, ckpt_path=str(last) if last.exists() else None)
    else:
        trainer.fit(module, loaders["train"], loaders["val"], ckpt_path=str(last) if last.exists() else None)
    if trainer.interrupted or trainer.global_step < stage_cfg.max_steps:
        # Lightning returns normally after Ctrl-C or SIGTERM; the stage is not finished and must not count as done.
        raise FaultError(
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
    if path.exists():  # a rerun of a stage that crashed after saving: replace, never merge
        shutil.rmtree(path)
    os.replace(tmp, path)


def stage_ild(ctx: Context) -> dict:
    init = ctx.stage_dir("init")
    candidates = init / "candidates"
    if _wants_candidates(ctx.cfg) and candidates.exists():
        sources = {kind: candidates / kind for kind in candidate_kinds()}
    else:
        sources = {"assigned": init / "student"}
    students = {name: _load_student(path) for name, path in sources.items()}
    c = ctx.cfg.ild
    module = ILDModule(students, ctx.teacher, _optim(c), c.loss, c.output_weight, c.mixer_weight, c.trainable)
    trainer = _fit(ctx, "ild", module, "ild")
    if not is_rank_zero():
        return {}
    trained = {
        name: _trained_student(ctx, "ild", trainer, module.students[name], f"students.{name}.", path)
        for name, path in sources.items()
    }
    # Per-layer losses of every candidate on held-out data (the input to layer selection).
    layer_losses = _heldout_layer_losses(ctx, trained, module)
    write_json(ctx.stage_dir("ild") / "layer_losses.json", layer_losses)
    if (init / "student" / "config.json").exists():  # a fixed map: the student is known now
        mixer_types = _load_student(init / "student").config.mixer_types
        student = trained.get("assigned") or compose_student(trained, mixer_types)
        _save_student(student, ctx.stage_dir("ild") / "student", ctx.tokenizer)
    if "assigned" not in trained:
        for kind, candidate in trained.items():
            _save_student(candidate, ctx.stage_dir("ild") / "candidates" / kind, ctx.tokenizer)
    plot_ild_layers(layer_losses, ctx.out / "ild_layer_losses.png")
    ctx.report["ild"] = {"tokens_seen": module.tokens_seen, "layer_losses": layer_losses}
    return {"tokens_seen": module.tokens_seen}


def _trained_student(
    ctx: Context, stage: str, trainer: L.Trainer, live: HybridForCausalLM, prefix: str, source: Path
) -> HybridForCausalLM:
    """The trained student in fp32 on rank 0: the live module, or under DeepSpeed the consolidated fp32 master
    weights of the stage's final checkpoint (ZeRO keeps bf16 or partitioned copies in the module)."""
    if not is_deepspeed(trainer.strategy):
        return live
    student = _load_student(source)
    load_consolidated(student, consolidated_state_dict(ctx.stage_dir(stage) / "checkpoints" / "last.ckpt", prefix))
    return student


@torch.no_grad()
def _heldout_layer_losses(
    ctx: Context, students: dict[str, HybridForCausalLM], module: ILDModule
) -> dict[str, dict[str, float]]:
    """{layer: {candidate: mean held-out ILD loss}} on rank 0, with the stage's loss settings, on the training
    stages' device and precision."""
    placement = eval_placement(_container(ctx.cfg.trainer))
    probe = ILDModule(
        students,
        ctx.teacher,
        module.optim,
        module.loss_kind,
        module.output_weight,
        module.mixer_weight,
    ).eval()
    data = DistillDataModule(ctx.data_cfg, ctx.tokenizer, "ild")
    data.setup()
    sums: dict[tuple[str, int], float] = {}
    batches = 0
    with placed({"probe": probe}, placement):
        for batch in data.val_dataloader():
            if ctx.cfg.eval.max_batches is not None and batches >= ctx.cfg.eval.max_batches:
                break
            batch = {k: v.to(placement.device) for k, v in batch.items()}
            for key, value in probe.layer_losses(batch).items():
                sums[key] = sums.get(key, 0.0) + float(value)
            batches += 1
    layer_losses: dict[str, dict[str, float]] = {}
    for (name, layer), total in sums.items():
        layer_losses.setdefault(str(layer), {})[name] = total / max(batches, 1)
    return layer_losses


def stage_select(ctx: Context) -> dict:
    """SMART: per-layer sensitivity from both candidates' held-out ILD losses, then the spacing rule."""
    cfg, spec = ctx.cfg, ctx.spec
    losses = json.loads((ctx.stage_dir("ild") / "layer_losses.json").read_text())
    scores = sensitivity_from_ild(losses, spec.num_layers)
    aligned = {kind: _load_student(ctx.stage_dir("ild") / "candidates" / kind) for kind in candidate_kinds()}
    teacher_bytes = teacher_cache_bytes(spec.num_layers, spec.num_kv_heads, spec.head_dim).per_token
    per_mla_layer = student_cache_bytes(aligned[PLACED_KIND.name].config).per_token // spec.num_layers
    layers_cfg = cfg.student.mla_layers
    if cfg.select.get("num_mla_layers") is not None:
        count = cfg.select.num_mla_layers
    elif layers_cfg == "smart" and cfg.student.num_mla_layers is not None:
        count = cfg.student.num_mla_layers
    elif layers_cfg == "smart":
        count = num_mla_for_budget(cfg.student.kv_budget, teacher_bytes, per_mla_layer, spec.num_layers)
    else:
        count = len(list(layers_cfg))
    if cfg.select.rule == "uniform":
        selection = uniform_select(spec.num_layers, count)
    else:
        selection = smart_select(scores, count, cfg.select.keep_terminal)
    for line in selection.trace:
        log.info("select: %s", line)
    mixer_types = mixer_map(spec.num_layers, selection.layers)
    folder = ctx.stage_dir("select")
    _save_student(compose_student(aligned, mixer_types), folder / "student", ctx.tokenizer)
    initial = {kind: _load_student(ctx.stage_dir("init") / "candidates" / kind) for kind in candidate_kinds()}
    _save_student(compose_student(initial, mixer_types), folder / "initialized_student", ctx.tokenizer)
    result = {
        "mla_layers": selection.layers,
        "scores": scores,
        "trace": selection.trace,
        "kv_bytes_per_token": per_mla_layer * len(selection.layers),
        "teacher_kv_bytes_per_token": teacher_bytes,
    }
    write_json(folder / "selection.json", result)
    plot_selection(scores, selection.layers, ctx.out / "select_scores.png")
    ctx.report["select"] = result
    return {"mla_layers": selection.layers}


def stage_kd(ctx: Context) -> dict:
    source = ctx.latest_student_dir()
    student = _load_student(source)
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
        use_triton=c.use_triton,
    )
    module = KDModule(student, ctx.teacher, _optim(c), loss)
    trainer = _fit(ctx, "kd", module, "kd")
    if not is_rank_zero():
        return {}
    trained = _trained_student(ctx, "kd", trainer, module.student, "student.", source)
    _save_student(trained, ctx.stage_dir("kd") / "student", ctx.tokenizer)
    ctx.report["kd"] = {"tokens_seen": module.tokens_seen}
    return {"tokens_seen": module.tokens_seen}


def stage_dpo(ctx: Context) -> dict:
    """Preference tuning of the latest student against a frozen copy of itself."""
    c = ctx.cfg.dpo
    source = ctx.latest_student_dir()
    policy, reference = _load_student(source), _load_student(source)
    sources = [SourceConfig(**_container(s)) for s in c.sources] if c.sources else []
    train_pairs, eval_pairs = preference_splits(sources, ctx.tokenizer, ctx.data_cfg.seq_len, ctx.cfg.seed)
    pad = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else ctx.tokenizer.eos_token_id
    collate = functools.partial(collate_pairs, pad_id=pad)
    batch = ctx.data_cfg.micro_batch_size
    generator = torch.Generator().manual_seed(ctx.cfg.seed)
    loaders = {
        "train": DataLoader(train_pairs, batch_size=batch, shuffle=True, generator=generator, collate_fn=collate),
        "val": DataLoader(eval_pairs, batch_size=batch, collate_fn=collate),
    }
    before = preference_metrics(policy, reference, loaders["val"], c.beta)
    module = DPOModule(policy, reference, _optim(c), c.beta)
    trainer = _fit(ctx, "dpo", module, None, loaders)
    if not is_rank_zero():
        return {}
    policy = _trained_student(ctx, "dpo", trainer, module.policy, "policy.", source)
    after = preference_metrics(policy, reference.to(policy.device), loaders["val"], c.beta)
    log.info("dpo held-out: before %s, after %s", before, after)
    _save_student(policy, ctx.stage_dir("dpo") / "student", ctx.tokenizer)
    ctx.report["dpo"] = {
        "pairs": {"train": len(train_pairs), "held_out": len(eval_pairs)},
        "before": before,
        "after": after,
    }
    return {"before": before, "after": after}


def stage_eval(ctx: Context) -> dict:
    """Teacher, initialized and final student on the held-out stream, on the training stages' device and precision."""
    data = DistillDataModule(ctx.data_cfg, ctx.tokenizer, phase="kd")
    data.setup()
    loader = data.val_dataloader()
    max_batches = ctx.cfg.eval.max_batches
    placement = eval_placement(_container(ctx.cfg.trainer))
    initialized = initialized_student_dir(ctx.out)
    candidates = [("initialized student", initialized), ("final student", ctx.latest_student_dir())]
    students = {name: _load_student(path) for name, path in candidates if (path / "config.json").exists()}
    rows: dict[str, dict] = {}
    start = time.perf_counter()
    with placed({"teacher": ctx.teacher, **students}, placement):
        rows["teacher"] = heldout_loss(ctx.teacher, loader, max_batches)
        for name, student in students.items():
            rows[name] = heldout_loss(student, loader, max_batches)
            rows[name].update(heldout_agreement(student, ctx.teacher, loader, max_batches))
        scored = time.perf_counter()
        prompts = [
            ctx.tokenizer.decode(b["input_ids"][0, :12], skip_special_tokens=True)
            for b in _first(loader, ctx.cfg.eval.num_generations)
        ]
        ctx.report["generations"] = side_by_side(
            {"teacher": ctx.teacher, **students}, ctx.tokenizer, prompts, ctx.cfg.eval.max_new_tokens
        )
    seconds = {"scores": scored - start, "generations": time.perf_counter() - scored}
    log.info(
        "eval on %s (autocast %s): scores %.1f s, generations %.1f s",
        placement.device,
        placement.autocast,
        seconds["scores"],
        seconds["generations"],
    )
    rows["teacher"]["params"] = sum(p.numel() for p in ctx.teacher.parameters())
    rows["teacher"]["kv_bytes_per_token"] = teacher_cache_bytes(
        ctx.spec.num_layers, ctx.spec.num_kv_heads, ctx.spec.head_dim
    ).per_token
    for name, student in students.items():
        rows[name]["params"] = sum(p.numel() for p in student.parameters())
        rows[name]["kv_bytes_per_token"] = student_cache_bytes(student.config).per_token
    ctx.report["eval"] = rows
    ctx.report["eval_placement"] = {"device": str(placement.device), "autocast": str(placement.autocast)}
    ctx.report["eval_seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    ctx.report["tokens_seen"] = sum(ctx.report.get(s, {}).get("tokens_seen", 0) for s in TRAINING_STAGES)
    print(summary_table(rows))
    plot_losses(ctx.out, ctx.out / "loss_curves.png")
    return {}


def _first(loader: DataLoader, count: int) -> list[dict]:
    batches = []
    for batch in loader:
        if len(batches) >= count:
            break
        batches.append(batch)
    return batches


def stage_export(ctx: Context) -> dict:
    dtype = getattr(torch, ctx.cfg.export.dtype)
    student = _load_student(ctx.latest_student_dir())
    _save_student(student, ctx.out / "student", ctx.tokenizer, dtype=dtype)
    ctx.report["export"] = {"path": str(ctx.out / "student"), "dtype": ctx.cfg.export.dtype}
    return {}


def summary_table(rows: dict[str, dict]) -> str:
    lines = [
        f"{'model':<20} {'held-out loss':>13} {'perplexity':>10} {'KL to teacher':>13} {'top-1 agree':>11} "
        f"{'KV B/token':>10} {'params':>12}"
    ]
    for name, row in rows.items():
        kl = f"{row['kl_to_teacher']:>13.4f}" if "kl_to_teacher" in row else f"{'-':>13}"
        agree = f"{row['top1_agreement']:>11.3f}" if "top1_agreement" in row else f"{'-':>11}"
        lines.append(
            f"{name:<20} {row['loss']:>13.4f} {row['perplexity']:>10.2f} {kl} {agree} {row['kv_bytes_per_token']:>10} "
            f"{row['params']:>12,}"
        )
    return "\n".join(lines)


STAGES = {
    "init": stage_init,
    "ild": stage_ild,
    "select": stage_select,
    "kd": stage_kd,
    "dpo": stage_dpo,
    "eval": stage_eval,
    "export": stage_export,
}
