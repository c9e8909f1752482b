"""metrics.csv survives a resume: a second logger in the same stage folder appends to the first one's rows (Lightning's
CSVLogger deletes them), also when it logs new columns."""

from __future__ import annotations

import csv

from train.runtime.csv_log import ResumableCSVLogger


def _rows(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_resumed_logger_appends_to_the_earlier_rows(tmp_path):
    first = ResumableCSVLogger(save_dir=str(tmp_path), name="logs", version="")
    first.log_metrics({"train/loss": 3.0, "lr": 1e-3}, step=0)
    first.log_metrics({"train/loss": 2.5, "lr": 1e-3}, step=1)
    first.save()

    resumed = ResumableCSVLogger(save_dir=str(tmp_path), name="logs", version="")
    resumed.log_metrics({"train/loss": 2.0, "lr": 9e-4}, step=2)
    resumed.save()
    resumed.log_metrics({"train/loss": 1.5, "val/loss": 1.7}, step=3)  # a new column rewrites the header
    resumed.save()

    rows = _rows(tmp_path / "logs" / "metrics.csv")
    assert [r["step"] for r in rows] == ["0", "1", "2", "3"]
    assert [float(r["train/loss"]) for r in rows] == [3.0, 2.5, 2.0, 1.5]
    assert rows[3]["val/loss"] == "1.7" and rows[0]["val/loss"] == "" and rows[0]["lr"] == "0.001"
