"""init: the student from the teacher's weights (MLA by SVD of the attention, Mamba2 / GDN from Q/K/V/O, everything
else copied), then calibrated on the first rows of the ILD stream (the output scale per channel of the recurrent
layers, models/init/calibrate.py). When the select stage will choose the layer map, one candidate per mixer kind is
initialized too: MLA and the kinds of `select.fill_kinds`."""

from __future__ import annotations

import logging

import torch

from data.datamodule import DistillDataModule
from models import HybridForCausalLM
from models.init import InitReport, convert_teacher
from models.init.calibrate import calibrate_student, calibrated_layers
from models.mixers import candidate_kinds
from train.config import TrainConfig, calibration_rows, student_init_kwargs

from .context import Context
from .eval import eval_placement, placed

log = logging.getLogger(__name__)


def wants_candidates(cfg: TrainConfig) -> bool:
    """Whether ILD aligns one candidate per kind for every layer (what select scores)."""
    mode = cfg.ild.candidates
    return mode == "both" or (mode == "auto" and "select" in cfg.stages)


def run(ctx: Context) -> dict:
    kwargs = student_init_kwargs(ctx.cfg.student)
    folder = ctx.stage_dir("init")
    calibration = CalibrationText(ctx)
    if wants_candidates(ctx.cfg):
        for kind in candidate_kinds(ctx.cfg.select.fill_kinds):  # one all-<kind> student each, aligned by ILD
            every_layer = {"mla_layers": None, "mixer_types": [kind] * ctx.spec.num_layers}
            candidate, report = convert_teacher(ctx.teacher, ctx.spec, **{**kwargs, **every_layer})
            calibration.fit(candidate, report)
            report.to_json(folder / f"init_report_{kind}.json")
            ctx.save_student(candidate, folder / "candidates" / kind)
    if kwargs["mla_layers"] == "smart":  # the map comes from the select stage
        return {}
    student, report = convert_teacher(ctx.teacher, ctx.spec, **kwargs)
    calibration.fit(student, report)
    print(report.table())
    report.to_json(folder / "init_report.json")
    ctx.save_student(student, folder / "student")
    ctx.report["init"] = {"student_params": report.student_params, "teacher_params": report.teacher_params}
    return {"mixer_types": student.config.mixer_types}


class CalibrationText:
    """The first `student.calibration_rows` rows of the ILD stream, read once (on first need) and fitted on for
    every student the stage initializes, on the training stages' device and precision."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.rows = calibration_rows(ctx.cfg)
        self.batches: list[dict[str, torch.Tensor]] | None = None

    def fit(self, student: HybridForCausalLM, report: InitReport) -> None:
        if not self.rows or not calibrated_layers(student):
            return
        if self.batches is None:
            self.batches = self._read()
        placement = eval_placement(self.ctx.cfg.trainer)
        with placed({"teacher": self.ctx.teacher, "student": student}, placement):
            batches = ({k: v.to(placement.device) for k, v in b.items()} for b in self.batches)
            fitted = {row["layer"]: row for row in calibrate_student(self.ctx.teacher, student, batches)}
        for row in report.layers:
            row.update(fitted.get(row["layer"], {}))
        before = [r["calib_rel_err_before"] for r in fitted.values()]
        after = [r["calib_rel_err_after"] for r in fitted.values()]
        log.info(
            "init: calibrated %d %s layers on %d rows: output rel. error %.3f -> %.3f (mean)",
            len(fitted),
            "/".join(sorted({r["mixer"] for r in fitted.values()})),
            self.rows,
            sum(before) / len(before),
            sum(after) / len(after),
        )

    def _read(self) -> list[dict[str, torch.Tensor]]:
        data = DistillDataModule(self.ctx.data_cfg, self.ctx.tokenizer, "ild", rank=0, world_size=1)
        batches, rows = [], 0
        for batch in data.phase_dataloader("ild"):
            take = min(self.rows - rows, batch["input_ids"].shape[0])
            batches.append({k: batch[k][:take] for k in ("input_ids", "attention_mask", "position_ids")})
            rows += take
            if rows >= self.rows:
                break
        return batches
