"""`validate_config(cfg)`: what types cannot say (choices, ranges, stage order, the student against the teacher's
shape), before any model loads. Raises ConfigError with one line naming the key, the bad value and what is allowed."""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from train.stages import STAGE_NAMES as STAGES

from .errors import ConfigError, at_least, between, choice, error_chain, fail, one_line
from .schema import (
    ACCELERATORS,
    DTYPES,
    LOGGER_SCHEMAS,
    PRECISIONS,
    STRATEGY_SCHEMAS,
    TINY_TEACHER,
    DDPStrategyConfig,
    DeepSpeedStrategyConfig,
    TrainConfig,
    WandbLoggerConfig,
)
from .student import check_student
from .teacher import check_teacher, check_teacher_tokenizer, teacher_spec
from .tokenizers import check_kd_teacher

log = logging.getLogger(__name__)


def check_stages(stages: list[str]) -> None:
    """Stages are a non-empty, duplicate-free subsequence of STAGES."""
    stages = list(stages)
    if not stages:
        fail("stages", stages, f"a non-empty ordered subset of {list(STAGES)}")
    for s in stages:
        if s not in STAGES:
            raise ConfigError(f"stages: {s!r} is not a stage; allowed, in this order: {', '.join(STAGES)}")
    for a, b in zip(stages, stages[1:], strict=False):
        if STAGES.index(b) <= STAGES.index(a):
            raise ConfigError(
                f"stages={stages}: {b!r} after {a!r} is out of order (or repeated); "
                f"stages run in the order {', '.join(STAGES)}"
            )


def _check_known_keys(node: Any, path: str = "") -> None:
    """Keys added with Hydra's `+` (e.g. `+student.mla.kv_lora_rnk=3`) bypass the schema; refuse them here."""
    if isinstance(node, ListConfig):
        children = [(f"{path.rstrip('.')}[{i}].", node._get_node(i)) for i in range(len(node))]
    else:
        schema = OmegaConf.get_type(node)
        known = {f.name for f in fields(schema)} if schema is not None and is_dataclass(schema) else None
        children = []
        for key in node.keys():
            child = node._get_node(key)
            if known is not None and key not in known:
                import difflib

                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f" (did you mean {path}{close[0]}?)" if close else ""
                allowed = ", ".join(sorted(known))
                raise ConfigError(f"{path}{key}={child._value()!r} is not a config key{hint}; allowed here: {allowed}")
            children.append((f"{path}{key}.", child))
    for child_path, child in children:
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_none() and not child._is_missing():
            _check_known_keys(child, child_path)


def check_output_dir(output_dir: str) -> None:
    """output_dir: a directory that exists and is writable, or one that can be made (nothing is created here)."""
    if not output_dir:
        fail("output_dir", output_dir, "a directory path")
    path = Path(output_dir).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        what = "is" if existing == path else f"lies under {existing}, which is"
        fail("output_dir", output_dir, f"a directory; it {what} a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        fail("output_dir", output_dir, f"a writable directory; {existing} is not writable by this user")


def typed_config(cfg: Any) -> TrainConfig:
    """The config as TrainConfig (dataclasses, resolved); untyped input (a saved config.yaml) is typed here."""
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(cfg, TrainConfig):
        return cfg
    try:
        if not isinstance(cfg, DictConfig) or OmegaConf.get_type(cfg) is not TrainConfig:
            cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        _check_known_keys(cfg)
        obj = OmegaConf.to_object(cfg)
    except (OmegaConfBaseException, ValueError) as e:
        # A group that is a component's own dataclass (kd.*, ild.*) checks itself when built: its message is whole.
        own = next((x for x in error_chain(e) if type(x) is ValueError and _names_a_key(str(x))), None)
        raise ConfigError(str(own) if own is not None else one_line(e)) from e
    for group, schemas, kind_key in (("strategy", STRATEGY_SCHEMAS, "name"), ("logger", LOGGER_SCHEMAS, "kind")):
        value = getattr(obj, group)
        if isinstance(value, dict):  # untyped (no schema in its defaults): type it by its name / kind
            kind = value.get(kind_key)
            schema = schemas.get("deepspeed" if str(kind).startswith("deepspeed") else kind)
            if schema is None:
                fail(f"{group}.{kind_key}", kind, " | ".join(schemas))
            try:
                value = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), value))
            except OmegaConfBaseException as e:
                raise ConfigError(f"{group}: {one_line(e)}") from e
            setattr(obj, group, value)
    return obj


def _names_a_key(message: str) -> bool:
    """A component's own check ("kd.divergence='kl' is invalid; ...") rather than a conversion error of OmegaConf."""
    return re.match(r"[a-z_]+\.[\w.\[\]]+=", message) is not None


def _check_optim(group: str, c: Any) -> None:
    at_least(f"{group}.max_steps", c.max_steps, 1)
    if not (c.lr > 0 and math.isfinite(c.lr)):
        fail(f"{group}.lr", c.lr, "a finite number > 0")
    between(f"{group}.min_lr_ratio", c.min_lr_ratio, 0.0, 1.0)
    at_least(f"{group}.warmup_steps", c.warmup_steps, 0)
    if c.warmup_steps > c.max_steps:
        fail(f"{group}.warmup_steps", c.warmup_steps, f"at most {group}.max_steps ({c.max_steps})")
    at_least(f"{group}.weight_decay", c.weight_decay, 0.0, integer=False)
    at_least(f"{group}.val_every_n_steps", c.val_every_n_steps, 1)
    at_least(f"{group}.checkpoint_every_n_steps", c.checkpoint_every_n_steps, 1)


def _check_training(cfg: TrainConfig) -> None:
    stages = cfg.stages
    ild, kd, sel = cfg.ild, cfg.kd, cfg.select
    _check_optim("ild", ild)
    choice("ild.trainable", ild.trainable, ("mixers", "layers"))
    choice("ild.candidates", ild.candidates, ("auto", "both", "assigned"))
    if ild.output_weight == 0 and ild.mixer_weight == 0:
        fail("ild.output_weight", ild.output_weight, "> 0 when ild.mixer_weight is 0 (nothing to learn)")
    if cfg.student.mla_layers == "smart" and "select" not in stages:
        fail("student.mla_layers", "smart", "a list, 'all' or 'none' unless the select stage runs")
    if "select" in stages:
        if cfg.student.layers is not None:
            fail("student.layers", cfg.student.layers, "null when the select stage runs (SMART chooses the map)")
        if "ild" not in stages:
            raise ConfigError(f"stages={list(stages)}: 'select' needs 'ild' before it (SMART scores are ILD losses)")
        if ild.candidates == "assigned":
            fail("ild.candidates", ild.candidates, "'auto' or 'both' when the select stage runs")
        if (
            sel.num_mla_layers is None
            and cfg.student.mla_layers != "smart"
            and not isinstance(cfg.student.mla_layers, (list, tuple))
        ):
            fail(
                "select.num_mla_layers",
                None,
                f"an integer when student.mla_layers={cfg.student.mla_layers!r} is not a list (how many to place)",
            )
    if sel.num_mla_layers is not None:
        at_least("select.num_mla_layers", sel.num_mla_layers, 0)
    from models.select import SELECT_RULES, check_select_keys

    choice("select.rule", sel.rule, SELECT_RULES)
    try:
        check_select_keys(sel.fill_kinds, sel.context_tokens)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    _check_optim("kd", kd)
    if kd.jsd_beta in (0.0, 1.0):  # the loss takes them as forward / reverse KL; the config asks for that by name
        fail("kd.jsd_beta", kd.jsd_beta, "a number in (0, 1); use kd.divergence=forward_kl / reverse_kl")
    if kd.kl_weight == 0 and kd.ce_weight == 0:
        fail("kd.kl_weight", kd.kl_weight, "> 0 when kd.ce_weight is 0 (no loss)")
    at_least("kd.teacher_cache_k", kd.teacher_cache_k, 1)
    choice("kd.teacher_cache_dtype", kd.teacher_cache_dtype, ("float32", "float16"))
    if kd.teacher_cache is not None and kd.resolved_divergence != "forward_kl":
        fail("kd.divergence", kd.divergence, "forward_kl with kd.teacher_cache (top-k teacher log-probs)")
    _check_optim("dpo", cfg.dpo)
    if not cfg.dpo.beta > 0:
        fail("dpo.beta", cfg.dpo.beta, "a number > 0")
    if "dpo" in stages and not cfg.dpo.sources and cfg.teacher.name_or_path != "tiny":
        # The embedded preference pairs are written in the tiny corpus's language: only for the tiny teacher.
        fail("dpo.sources", [], "at least one preference dataset when the dpo stage runs")
    for i, src in enumerate(cfg.dpo.sources):
        try:
            src.validate(f"dpo.sources[{i}]")
        except ValueError as e:
            raise ConfigError(str(e)) from e
    if cfg.eval.max_batches is not None:
        at_least("eval.max_batches", cfg.eval.max_batches, 1)
    at_least("eval.num_generations", cfg.eval.num_generations, 0)
    at_least("eval.max_new_tokens", cfg.eval.max_new_tokens, 1)
    choice("export.dtype", cfg.export.dtype, DTYPES)
    choice("faults.nonfinite_loss", cfg.faults.nonfinite_loss, ("skip", "stop"))
    at_least("faults.max_skips", cfg.faults.max_skips, 0)


def _check_runtime(cfg: TrainConfig) -> None:
    t = cfg.trainer
    choice("trainer.accelerator", t.accelerator, ACCELERATORS)
    choice("trainer.precision", str(t.precision), PRECISIONS)
    at_least("trainer.num_nodes", t.num_nodes, 1)
    at_least("trainer.accumulate_grad_batches", t.accumulate_grad_batches, 1)
    at_least("trainer.log_every_n_steps", t.log_every_n_steps, 1)
    if t.gradient_clip_val is not None:
        at_least("trainer.gradient_clip_val", t.gradient_clip_val, 0.0, integer=False)
    if t.deterministic not in (True, False, "warn"):
        fail("trainer.deterministic", t.deterministic, "true | false | warn")
    d = t.devices
    if not (
        d == "auto"
        or (isinstance(d, int) and not isinstance(d, bool) and (d >= 1 or d == -1))
        or (isinstance(d, (list, tuple)) and d and all(isinstance(i, int) for i in d))
    ):
        fail("trainer.devices", d, "an integer >= 1, -1 (all), 'auto' or a list of device ids")
    cores = os.cpu_count() or 1
    if t.accelerator == "cpu" and isinstance(d, int) and not isinstance(d, bool) and d > cores:
        log.warning(  # allowed (a multi-process test of a cluster setup), but never silently slow
            "trainer.devices=%d on the CPU starts %d training processes on %d cores: they share the cores, so each "
            "step takes about %d times as long as on %d processes; the results equal those of %d devices",
            d, d, cores, -(-d // cores), cores, d,
        )  # fmt: skip
    st = cfg.strategy
    if isinstance(st, DeepSpeedStrategyConfig):
        if not st.name.startswith("deepspeed"):
            fail("strategy.name", st.name, "a name starting with 'deepspeed' for DeepSpeed settings")
        choice("strategy.stage", st.stage, (1, 2, 3))
        if st.offload_parameters and st.stage != 3:
            fail("strategy.offload_parameters", True, f"false unless strategy.stage is 3 (it is {st.stage})")
        # DeepSpeed runs on CPU processes too (gloo, train/runtime/deepspeed_strategy.py), in full precision only.
        if t.accelerator == "cpu" and t.precision not in ("32-true", "32", 32):
            fail("trainer.precision", t.precision, f"32-true with strategy {st.name!r} on CPU")
    elif isinstance(st, DDPStrategyConfig):
        choice("strategy.name", st.name, ("ddp", "ddp_spawn"))
    else:
        choice("strategy.name", st.name, ("auto",))
    choice("logger.kind", cfg.logger.kind, tuple(LOGGER_SCHEMAS))
    if isinstance(cfg.logger, WandbLoggerConfig):
        project = cfg.logger.project
        if not project or len(project) > 128 or re.search(r"[/\\#?%:]", project):
            # wandb's own rule, checked here so the mistake shows before any model loads.
            fail("logger.project", project, "a name of 1 to 128 characters without / \\ # ? % :")
        if not cfg.logger.name:
            fail("logger.name", cfg.logger.name, "a non-empty run name (default: run_name)")


def validate_config(cfg: Any, fetch_teacher: bool = False) -> TrainConfig:
    """Semantic checks before any model loads; raise ConfigError (one line: key, value, what is allowed).

    Reads at most the teacher's config.json (and its safetensors headers), and only for a local directory (see the
    module docstring); `fetch_teacher` also reads a Hub teacher's config.json, so its shape checks run too (the
    main job does, it needs the teacher anyway). Returns the typed config the pipeline runs on.
    """
    from hydra.core.hydra_config import HydraConfig

    c = typed_config(cfg)
    if HydraConfig.initialized():  # under @hydra.main: the preset must say its own name
        preset = HydraConfig.get().runtime.choices.get("conf")
        if preset is not None and preset != c.conf:
            fail(
                "conf",
                c.conf,
                f"the selected preset's name {preset!r} (conf/conf/{preset}.yaml must set conf: {preset})",
            )
    check_stages(c.stages)
    if c.restart_from is not None and c.restart_from not in c.stages:
        fail("restart_from", c.restart_from, f"null or one of stages {list(c.stages)}")
    check_output_dir(c.output_dir)
    check_teacher(c)
    try:
        c.data.validate()
    except ValueError as e:
        raise ConfigError(one_line(e).replace("data config: ", "data.")) from e
    _check_training(c)
    _check_runtime(c)
    spec = teacher_spec(c.teacher, fetch=fetch_teacher, data_seq_len=c.data.seq_len)
    known = spec is not None and c.teacher.name_or_path != TINY_TEACHER  # the tiny teacher is built to fit
    if known and c.data.seq_len > spec.max_position_embeddings:
        fail(
            "data.seq_len",
            c.data.seq_len,
            f"at most the teacher's max_position_embeddings {spec.max_position_embeddings}, or set "
            f"teacher.rope_scaling={{rope_type:yarn,factor:{-(-c.data.seq_len // spec.max_position_embeddings)}}}",
        )
    check_student(c, spec)
    check_teacher_tokenizer(c)
    check_kd_teacher(c, fetch_teacher)
    if c.trainer.device_memory_gib is not None and not c.trainer.device_memory_gib > 0:
        fail("trainer.device_memory_gib", c.trainer.device_memory_gib, "null (the GPU's own) or a number of GiB > 0")
    return c
