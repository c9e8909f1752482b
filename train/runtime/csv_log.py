"""The per-stage CSV metrics log (`<stage>/logs/metrics.csv`), kept across resumes.

Lightning's CSVLogger deletes an existing metrics.csv when a new Trainer starts in the same folder, so a resumed
stage would lose the history before the interruption (and the loss plot with it). This writer appends instead.
Steps between the last checkpoint and a crash are logged again after the resume: `read_metrics` keeps the last
value of a step (train/runtime/plots.py, bench/compare_losses.py read through it).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class AppendingExperimentWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):  # continue the columns of the earlier run's rows
            with open(self.metrics_file_path, newline="") as handle:
                self.metrics_keys = sorted(next(csv.reader(handle), []))

    def _check_log_dir_exists(self) -> None:
        """Keep the earlier run's metrics.csv (the base class deletes it)."""


class ResumableCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


def read_metrics(path: Path) -> dict[str, list[tuple[float, float]]]:
    """{metric: [(step, value)]} by step; a step logged twice (replayed after a resume) keeps its last value."""
    series: dict[str, dict[float, float]] = {}
    with open(path) as handle:
        for row in csv.DictReader(handle):
            step = row.get("step")
            for key, value in row.items():
                if key in ("step", "epoch") or not value or not step:
                    continue
                series.setdefault(key, {})[float(step)] = float(value)
    return {key: sorted(values.items()) for key, values in series.items()}
