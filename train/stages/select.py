"""select: SMART layer selection. Per-layer sensitivity from the held-out ILD losses of the per-kind candidates
(MLA and `select.fill_kinds`), then the spacing rule (or evenly spaced layers, the baseline) under the KV budget;
every other layer takes its best fill kind. The student is composed from the aligned candidates."""

from __future__ import annotations

import json
import logging

from models import teacher_cache_bytes
from models.flops import layer_cache_bytes
from models.mixers import candidate_kinds
from models.select import select_map
from train.runtime.plots import plot_selection

from .context import Context, write_json
from .ild import compose_student

log = logging.getLogger(__name__)


def run(ctx: Context) -> dict:
    """SMART: per-layer sensitivity from the candidates' held-out ILD losses, then the spacing rule."""
    cfg, spec, sel = ctx.cfg, ctx.spec, ctx.cfg.select
    fill_kinds = list(sel.fill_kinds)
    kinds = candidate_kinds(fill_kinds)
    ild = ctx.stage_dir("ild")
    missing = [k for k in kinds if not (ild / "candidates" / k / "config.json").exists()]
    if missing:  # init and ild ran with other select.fill_kinds (their settings do not include select's)
        raise ValueError(
            f"select.fill_kinds={fill_kinds}: ild aligned no {missing} candidate; rerun with restart_from=init"
        )
    losses = json.loads((ild / "layer_losses.json").read_text())
    aligned = {kind: ctx.load_student(ild / "candidates" / kind) for kind in kinds}
    teacher_bytes = teacher_cache_bytes(spec.num_layers, spec.num_kv_heads, spec.head_dim).per_token
    cache = layer_cache_bytes({kind: aligned[kind].config for kind in kinds})
    tokens = sel.context_tokens  # None: the budget counts bytes per token, constant state free (as before)
    costs = [{k: b.per_token if tokens is None else b.total(tokens) for k, b in row.items()} for row in cache]
    budget = None if cfg.student.kv_budget is None else cfg.student.kv_budget * teacher_bytes * (tokens or 1)
    layers_cfg = cfg.student.mla_layers
    if sel.num_mla_layers is not None:
        count = sel.num_mla_layers
    elif layers_cfg == "smart":
        count = cfg.student.num_mla_layers  # None: the most the budget allows
    else:
        count = len(list(layers_cfg))
    selection = select_map(losses, spec.num_layers, fill_kinds, count, costs, budget, sel.keep_terminal, sel.rule)
    for line in selection.trace:
        log.info("select: %s", line)
    mixer_types = selection.mixer_types
    folder = ctx.stage_dir("select")
    ctx.save_student(compose_student(aligned, mixer_types), folder / "student")
    initial = {kind: ctx.load_student(ctx.stage_dir("init") / "candidates" / kind) for kind in kinds}
    ctx.save_student(compose_student(initial, mixer_types), folder / "initialized_student")
    chosen = [cache[i][k] for i, k in enumerate(mixer_types)]
    result = {
        "mla_layers": selection.layers,
        "mixer_types": mixer_types,
        "fill_kinds": fill_kinds,
        "scores": selection.scores,  # log(L_best fill kind / L_mla) per layer
        "trace": selection.trace,
        "kv_bytes_per_token": sum(b.per_token for b in chosen),  # bf16 cache, fp32 recurrent state
        "state_bytes": sum(b.constant for b in chosen),
        "teacher_kv_bytes_per_token": teacher_bytes,
        "budget": {
            "kv_budget": cfg.student.kv_budget,
            "context_tokens": tokens,
            "bytes": budget,  # kv_budget x teacher bytes per token (x context_tokens); null: no budget
            "used": selection.cost,  # the map's bytes on the same measure
        },
        "layers": [
            {
                "layer": i,
                "kind": mixer_types[i],
                "ild_loss": {k: losses[str(i)][k] for k in kinds},
                "bytes": {k: {"per_token": b.per_token, "constant": b.constant} for k, b in cache[i].items()},
            }
            for i in range(spec.num_layers)
        ],
    }
    write_json(folder / "selection.json", result)
    plot_selection(selection.scores, selection.layers, ctx.out / "select_scores.png")
    ctx.report["select"] = result
    return {"mla_layers": selection.layers, "mixer_types": mixer_types}
