"""select: SMART layer selection. Per-layer sensitivity from the held-out ILD losses of the per-kind candidates,
then the spacing rule (or evenly spaced layers, the baseline); the student is composed from the aligned candidates."""

from __future__ import annotations

import json
import logging

from models import student_cache_bytes, teacher_cache_bytes
from models.mixers import PLACED_KIND, candidate_kinds, mixer_map
from models.select import num_mla_for_budget, sensitivity_from_ild, smart_select, uniform_select
from train.runtime.plots import plot_selection

from .context import Context, load_student, write_json
from .ild import compose_student

log = logging.getLogger(__name__)


def run(ctx: Context) -> dict:
    """SMART: per-layer sensitivity from the candidates' held-out ILD losses, then the spacing rule."""
    cfg, spec = ctx.cfg, ctx.spec
    losses = json.loads((ctx.stage_dir("ild") / "layer_losses.json").read_text())
    scores = sensitivity_from_ild(losses, spec.num_layers)
    aligned = {kind: load_student(ctx.stage_dir("ild") / "candidates" / kind) for kind in candidate_kinds()}
    teacher_bytes = teacher_cache_bytes(spec.num_layers, spec.num_kv_heads, spec.head_dim).per_token
    per_mla_layer = student_cache_bytes(aligned[PLACED_KIND.name].config).per_token // spec.num_layers
    layers_cfg = cfg.student.mla_layers
    if cfg.select.num_mla_layers is not None:
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
    ctx.save_student(compose_student(aligned, mixer_types), folder / "student")
    initial = {kind: load_student(ctx.stage_dir("init") / "candidates" / kind) for kind in candidate_kinds()}
    ctx.save_student(compose_student(initial, mixer_types), folder / "initialized_student")
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
