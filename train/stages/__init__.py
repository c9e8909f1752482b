"""The stage registry: every stage of the pipeline, in the only order stages run.

A stage is one file here (`train/stages/<name>.py` with `run(ctx) -> dict`) and one entry below. Everything that
depends on which stages exist asks this registry: the config's stage-order check, the pipeline loop (which stages
all ranks run), where the latest student is, what W&B uploads, which loss curves are drawn. Importing it loads no
stage code (stage files import torch, Lightning and the models; the config check must stay light).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    trains: bool = False  # a Lightning fit in which every rank takes part; other stages are rank 0's work
    makes_student: bool = False  # writes <stage>/student: the latest one is what later stages start from
    plots: tuple[tuple[str, str], ...] = ()  # (W&B key, PNG file in output_dir) logged when the stage ends
    uploads_report: bool = False  # the report artifact is uploaded when the stage ends (not only at the end)
    # The config groups that are this stage's own settings: a rerun compares them (with the teacher, student,
    # data and earlier stages' ones) before it continues the stage (train/runtime/rerun.py).
    settings: tuple[str, ...] = ()
    needs_student: bool = True  # starts from the latest student: some earlier stage must have made one

    @property
    def module(self) -> Any:
        return importlib.import_module(f"train.stages.{self.name}")

    def run(self, ctx: Any) -> dict:
        """Run the stage on the pipeline's Context; returns what goes into its done.json."""
        return self.module.run(ctx) or {}

    def wandb_log(self, run: Any, out: Any, report: dict, entry: dict) -> None:
        """What the stage adds to the W&B run beyond its plots (its own `wandb_log`, when it has one): rows into
        `entry` (logged with the plots as one history row) or summary values on `run`."""
        hook = getattr(self.module, "wandb_log", None)
        if hook is not None:
            hook(run, out, report, entry)


STAGES: tuple[Stage, ...] = (
    Stage("init", "the student from the teacher's weights (and per-kind candidates for select)", makes_student=True,
          needs_student=False),
    Stage("ild", "layer-wise alignment to the teacher's hidden states", trains=True, makes_student=True,
          plots=(("ild/layer_losses_plot", "ild_layer_losses.png"),), settings=("ild",)),
    Stage("select", "SMART: which layers keep attention (MLA), from the ILD losses", makes_student=True,
          plots=(("select/scores_plot", "select_scores.png"),), settings=("select",)),
    Stage("kd", "end-to-end distillation on the teacher's logits", trains=True, makes_student=True,
          settings=("kd",)),
    Stage("dpo", "preference tuning against a frozen copy of the student", trains=True, makes_student=True,
          settings=("dpo",)),
    Stage("eval", "teacher vs students on held-out data, side-by-side generations", uploads_report=True),
    Stage("export", "the final student as a Hugging Face folder (output_dir/student)", settings=("export",)),
)  # fmt: skip
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
TRAINING_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.trains)
STUDENT_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.makes_student)


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"stage {name!r} is not a stage; stages: {', '.join(STAGE_NAMES)}")
