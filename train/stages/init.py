"""init: the student from the teacher's weights (MLA by SVD of the attention, Mamba2 from Q/K/V/O, everything else
copied). When the select stage will choose the layer map, one candidate per mixer kind is initialized too: MLA
and the kinds of `select.fill_kinds`."""

from __future__ import annotations

from models.init import convert_teacher
from models.mixers import candidate_kinds
from train.config import TrainConfig, student_init_kwargs

from .context import Context


def wants_candidates(cfg: TrainConfig) -> bool:
    """Whether ILD aligns one candidate per kind for every layer (what select scores)."""
    mode = cfg.ild.candidates
    return mode == "both" or (mode == "auto" and "select" in cfg.stages)


def run(ctx: Context) -> dict:
    kwargs = student_init_kwargs(ctx.cfg.student)
    folder = ctx.stage_dir("init")
    if wants_candidates(ctx.cfg):
        for kind in candidate_kinds(ctx.cfg.select.fill_kinds):  # one all-<kind> student each, aligned by ILD
            every_layer = {"mla_layers": None, "mixer_types": [kind] * ctx.spec.num_layers}
            candidate, report = convert_teacher(ctx.teacher, ctx.spec, **{**kwargs, **every_layer})
            report.to_json(folder / f"init_report_{kind}.json")
            ctx.save_student(candidate, folder / "candidates" / kind)
    if kwargs["mla_layers"] == "smart":  # the map comes from the select stage
        return {}
    student, report = convert_teacher(ctx.teacher, ctx.spec, **kwargs)
    print(report.table())
    report.to_json(folder / "init_report.json")
    ctx.save_student(student, folder / "student")
    ctx.report["init"] = {"student_params": report.student_params, "teacher_params": report.teacher_params}
    return {"mixer_types": student.config.mixer_types}
