"""Weights & Biases tracking: one W&B run per pipeline run, across all its stages and resumes.

- Identity: the run id is `WANDB_RUN_ID` when set (the SLURM scripts derive it from the job id, so a requeued job
  continues its run), else the id saved in `<output_dir>/.wandb_run_id`, else a new one saved there; rerunning the
  same command therefore resumes the same W&B run (`resume="allow"`). Name, project, entity, group and tags come
  from the `logger` config group.
- The whole resolved config (secret values masked, train/runtime/redact.py) is the run's config.
- Stages share the run: `StageWandbLogger` prefixes every metric with its stage (`ild/train/loss`,
  `kd/train/loss`) and logs a per-stage step (`ild/step`), the x-axis of that stage's charts.
- When a stage ends, its plots and what its own `wandb_log` adds (train/stages/__init__.py: ILD's per-layer
  held-out losses as a table, eval's numbers as summary values); after eval the report is uploaded;
  at the end report.json, the PNG plots and the stage summaries (selection.json, layer_losses.json) form the
  `report-<run id>` artifact. Student weights stay out unless `logger.log_model=true`.

Only global rank 0 creates the run and logs to it. wandb is imported only when `logger.kind=wandb`.
"""

from __future__ import annotations

import logging
import os
import secrets
import string
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from .redact import redact, secret_values

if TYPE_CHECKING:
    from train.config import TrainConfig

log = logging.getLogger(__name__)
RUN_ID_FILE = ".wandb_run_id"
REPORT_FILES = ("report.json", "select/selection.json", "ild/layer_losses.json")


def run_id(out: Path) -> str:
    """The W&B run id of the pipeline run in `out`: WANDB_RUN_ID, else the saved one, else a new one (saved)."""
    path = out / RUN_ID_FILE
    chosen = os.environ.get("WANDB_RUN_ID") or (path.read_text().strip() if path.exists() else "")
    if not chosen:
        # From os.urandom, not `random`: seed_everything makes that repeat, so two runs would share an id.
        chosen = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    if not path.exists() or path.read_text().strip() != chosen:
        # Saved even when it came from the environment: a later rerun without WANDB_RUN_ID continues that run.
        tmp = path.with_name(f"{path.name}.tmp")
        tmp.write_text(chosen + "\n")
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written id
    return chosen


def redacted(node: Any, secrets: list[str] | None = None) -> Any:
    """`node` (dicts, lists, scalars) with every secret value of the environment masked in its strings."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(node, dict):
        return {key: redacted(value, secrets) for key, value in node.items()}
    if isinstance(node, list):
        return [redacted(value, secrets) for value in node]
    return redact(node, secrets) if isinstance(node, str) else node


def wandb_dir(logger: dict, out: Path) -> Path:
    """Where wandb/ goes: logger.save_dir, else $WANDB_DIR, else the run's output_dir."""
    return Path(logger.get("save_dir") or os.environ.get("WANDB_DIR") or out)


def _is_global_zero() -> bool:
    # Before Lightning sets up a strategy the rank comes from the environment (RANK, LOCAL_RANK, SLURM_PROCID);
    # Lightning's own launcher on a second node sets only NODE_RANK, so that one counts too.
    return rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", "0") == "0"


class Tracker:
    """The pipeline's W&B run; every method is a no-op without one (other loggers, ranks other than 0)."""

    def __init__(self, run: Any = None, out: Path | None = None, log_model: bool = False):
        self.run, self.out, self.log_model = run, out, log_model

    @classmethod
    def start(cls, cfg: TrainConfig, out: Path) -> Tracker:
        """Create or resume the run of `out` (W&B logger, global rank 0 only); log the resolved config."""
        logger = asdict(cfg.logger)
        if logger.get("kind") != "wandb" or not _is_global_zero():
            return cls()
        import wandb

        settings = init_kwargs(logger, out, str(cfg.run_name))
        if wandb.run is not None and wandb.run.id != settings["id"]:
            wandb.run.finish()  # a run left open in this process (a caller's own) must not receive this one's data
        run = wandb.init(**settings)
        config = redacted(asdict(cfg))
        run.config.update(config, allow_val_change=True)  # a resumed run may have changed an override
        log.info("W&B run %s (%s) in %s", run.id, run.name, wandb_dir(logger, out))
        return cls(run, out, bool(logger.get("log_model", False)))

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind: type | None, *_: Any) -> None:
        if self.run is not None:
            # A failed or interrupted pipeline marks the run failed; rerunning the command resumes it.
            self.run.finish(exit_code=0 if kind is None else 1)
            self.run = None

    def stage_done(self, stage: str, report: dict) -> None:
        """Log what a finished stage produced (called after its report section is written)."""
        if self.run is None:
            return
        import wandb

        from train.stages import stage as registered

        seconds = report.get("stage_seconds", {}).get(stage)
        if seconds is not None:
            self.run.summary[f"stage_seconds/{stage}"] = seconds
        entry: dict[str, Any] = {}
        definition = registered(stage)
        definition.wandb_log(self.run, self.out, report, entry)
        for key, file in definition.plots:
            if (self.out / file).exists():
                entry[key] = wandb.Image(str(self.out / file))
        if entry:
            self.run.log(entry)
        if definition.uploads_report:
            self._upload_report(stage)

    def pipeline_done(self, report: dict) -> None:
        """Upload report.json, the plots and the stage summaries; the exported student with logger.log_model."""
        if self.run is None:
            return
        if "tokens_seen" in report:
            self.run.summary["tokens_seen"] = report["tokens_seen"]
        self._upload_report("final")
        student = self.out / "student"
        if self.log_model and (student / "config.json").exists():
            import wandb

            artifact = wandb.Artifact(f"student-{self.run.id}", type="model")
            artifact.add_dir(str(student))
            self.run.log_artifact(artifact)

    def _upload_report(self, alias: str) -> None:
        import wandb

        artifact = wandb.Artifact(f"report-{self.run.id}", type="report")
        files = [self.out / name for name in REPORT_FILES] + sorted(self.out.glob("*.png"))
        for path in files:
            if path.exists():
                artifact.add_file(str(path), name=str(path.relative_to(self.out)))
        self.run.log_artifact(artifact, aliases=[alias])


def layer_loss_rows(layer_losses: dict[str, dict[str, float]]) -> list[list[Any]]:
    """layer_losses.json ({layer: {candidate: loss}}) as table rows [layer, candidate, loss], by layer."""
    return [
        [int(layer), candidate, float(loss)]
        for layer in sorted(layer_losses, key=int)
        for candidate, loss in sorted(layer_losses[layer].items())
    ]


def init_kwargs(logger: dict, out: Path, run_name: str) -> dict[str, Any]:
    """wandb.init arguments from the `logger` group: the run of `out`, resumed if it exists."""
    directory = wandb_dir(logger, out)
    directory.mkdir(parents=True, exist_ok=True)
    # WANDB_MODE=disabled (tests, a quick switch-off) wins over logger.offline; otherwise offline means offline.
    offline = logger.get("offline") and os.environ.get("WANDB_MODE") != "disabled"
    return {
        "project": logger.get("project"),
        "entity": logger.get("entity"),
        "name": logger.get("name") or run_name,
        "group": logger.get("group"),
        "tags": list(logger.get("tags") or []),
        "id": run_id(out),
        "resume": "allow",
        "dir": str(directory),
        "mode": "offline" if offline else None,
    }


class StageWandbLogger(WandbLogger):
    """Lightning's WandbLogger for one stage of the pipeline's run: `<stage>/<metric>` keys, `<stage>/step` axis.

    Inside the pipeline the run already exists (Tracker.start) and is reused; alone (make_trainer called directly)
    it creates the run of `out` itself.
    """

    LOGGER_JOIN_CHAR = "/"

    def __init__(self, stage: str, logger: dict, out: Path, run_name: str):
        import wandb

        run = None
        if _is_global_zero():
            # Created here rather than by WandbLogger, whose default x-axis (trainer/global_step for "*") would
            # fight the per-stage ones.
            run = wandb.run or wandb.init(**init_kwargs(logger, out, run_name))
        super().__init__(
            save_dir=str(wandb_dir(logger, out)),
            prefix=stage,
            experiment=run,
            log_model=False,  # checkpoints hold optimizer state: far too large to upload every stage
        )
        self.stage = stage
        self._axis_defined = False

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        run = self.experiment
        step_key = f"{self.stage}/step"
        if not self._axis_defined:
            # Each stage's charts use its own optimizer step: ILD and KD both start at 0 in one run.
            run.define_metric(step_key)
            run.define_metric(f"{self.stage}/*", step_metric=step_key)
            self._axis_defined = True
        row = {f"{self.stage}/{key}": value for key, value in metrics.items()}
        if step is not None:
            row[step_key] = step
        run.log(row)
