"""W&B tracking, offline: the shrunk tiny preset through `train.pipeline.run` with logger=wandb, interrupted in KD
and resumed, then the offline run folders read back (their `.wandb` record logs): one run id across both
processes, the resolved config, every stage's metrics on its own step axis, the ILD layer table and plot, and
report.json + plots as an artifact without weights. Then WANDB_RUN_ID from the environment wins."""

from __future__ import annotations

import csv
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.train.test_pipeline import Interrupt, small
from train.pipeline import run
from train.runtime.tracking import RUN_ID_FILE, layer_loss_rows, redacted
from train.runtime.tracking import run_id as pipeline_run_id


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch) -> Path:
    """Offline W&B with every folder of it inside tmp_path (conftest disables W&B by default)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    for name in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    return tmp_path / "wandb_dir"


def records(path: Path) -> list:
    """The protobuf records of a `.wandb` file (LevelDB log format: 32 KiB blocks of crc/length/type chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, chunks, out = 7, 32768, [], []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            out.append(record)
            chunks = []
    return out


def offline_run(folder: Path, timeout: float = 30.0) -> dict:
    """What an offline run folder holds: config, history rows, metric definitions, artifacts, exit code.

    wandb's writer is a separate process that may still be flushing when `finish()` has returned: wait for the
    run's last record (exit)."""
    (log_file,) = folder.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while not any(r.WhichOneof("record_type") == "exit" for r in records(log_file)) and time.monotonic() < deadline:
        time.sleep(0.5)
    run = {"history": [], "metrics": {}, "artifacts": [], "exit_code": None, "config": {}}
    for record in records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"], run["name"], run["group"] = record.run.run_id, record.run.display_name, record.run.run_group
            run["tags"] = list(record.run.tags)
        elif kind == "config":
            for item in record.config.update:
                run["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            items = record.history.item
            run["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in items})
        elif kind == "metric":
            run["metrics"][record.metric.glob_name or record.metric.name] = record.metric.step_metric
        elif kind == "artifact":
            a = record.artifact
            paths = [c.path for c in a.manifest.contents]
            run["artifacts"].append({"name": a.name, "type": a.type, "aliases": list(a.aliases), "paths": paths})
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def test_offline_run_has_config_metrics_tables_and_artifacts(tmp_path, teacher_cache, wandb_dir, monkeypatch):
    out = tmp_path / "run"
    cfg = small(
        out,
        teacher_cache,
        "logger=wandb",
        "logger.offline=true",
        "logger.tags=[ci,tiny]",
        "logger.group=tests",
        "trainer.log_every_n_steps=1",
        "teacher.tiny.train_steps=5",  # below: what W&B received, not how well the student learned
        "data.seq_len=64",
        "ild.max_steps=4",
        "kd.max_steps=4",
        "eval.max_batches=1",
        "eval.num_generations=1",
    )
    with pytest.raises(RuntimeError, match="injected"):
        run(cfg, callbacks={"kd": [Interrupt(3)]})
    first_id = (out / RUN_ID_FILE).read_text().strip()
    run(cfg)  # the same command again: resumes KD, and the W&B run
    folders = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{first_id}") for f in folders), folders
    interrupted, resumed = (offline_run(f) for f in folders)
    assert interrupted["id"] == resumed["id"] == first_id
    assert interrupted["exit_code"] == 1 and resumed["exit_code"] == 0
    assert resumed["name"] == "tiny" and resumed["group"] == "tests" and resumed["tags"] == ["ci", "tiny"]

    # The resolved config: interpolations filled in (output_dir from ${run_name} -> the override here).
    config = resumed["config"]
    assert config["logger"]["kind"] == "wandb" and config["kd"]["max_steps"] == 4
    assert config["output_dir"] == str(out) and config["run_name"] == "tiny"

    # Every metric each stage logged (its metrics.csv) reached W&B under <stage>/, on the stage's own axis.
    keys = {key for row in interrupted["history"] + resumed["history"] for key in row}
    for stage in ("ild", "kd"):
        with open(out / stage / "logs" / "metrics.csv") as handle:
            logged = {k for row in csv.DictReader(handle) for k, v in row.items() if v and k != "step"}
        assert {"train/loss", "train/lr", "train/tokens_seen", "train/tokens_per_s"} <= logged
        missing = {f"{stage}/{k}" for k in logged} - keys
        assert not missing, missing
        assert interrupted["metrics"][f"{stage}/*"] == f"{stage}/step"
    assert resumed["metrics"]["kd/*"] == "kd/step"
    kd_steps = [row["kd/step"] for row in resumed["history"] if "kd/train/loss" in row]
    assert kd_steps and min(kd_steps) > 0 and max(kd_steps) == 3  # continues from its checkpoint to the last step

    # Per-layer ILD losses: a table (4 layers x 1 candidate) and the plot.
    (table_row,) = [row for row in interrupted["history"] if "ild/layer_losses/_type" in row]
    assert table_row["ild/layer_losses/_type"] == "table-file" and table_row["ild/layer_losses/nrows"] == 4
    assert table_row["ild/layer_losses_plot/_type"] == "image-file"
    (table_file,) = (folders[0] / "files" / "media" / "table" / "ild").glob("layer_losses_*.table.json")
    table = json.loads(table_file.read_text())
    layer_losses = json.loads((out / "ild" / "layer_losses.json").read_text())
    assert table["columns"] == ["layer", "candidate", "loss"] and table["data"] == layer_loss_rows(layer_losses)
    assert list((folders[0] / "files" / "media" / "images").glob("**/*.png"))

    # report.json and the plots, after eval and at the end; no weights unless logger.log_model.
    reports = [a for a in resumed["artifacts"] if a["type"] == "report"]
    assert [set(a["aliases"]) for a in reports] == [{"latest", "eval"}, {"latest", "final"}]
    assert reports[-1]["name"] == f"report-{first_id}"
    assert {"report.json", "loss_curves.png", "ild_layer_losses.png", "ild/layer_losses.json"} <= set(
        reports[-1]["paths"]
    )
    every_path = [p for a in interrupted["artifacts"] + resumed["artifacts"] for p in a["paths"]]
    assert not [p for p in every_path if p.endswith((".safetensors", ".ckpt", ".bin"))]

    # WANDB_RUN_ID (a SLURM job's) wins over the saved id, and becomes the saved id.
    monkeypatch.setenv("WANDB_RUN_ID", "slurm-job-42")
    run(cfg)  # every stage is done: only the run is resumed and the final report uploaded
    (env_folder,) = (wandb_dir / "wandb").glob("offline-run-*-slurm-job-42")
    assert offline_run(env_folder)["id"] == "slurm-job-42"
    assert (out / RUN_ID_FILE).read_text().strip() == "slurm-job-42"


def test_run_id_is_saved_once_and_the_environment_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    first = pipeline_run_id(tmp_path)
    assert pipeline_run_id(tmp_path) == first and (tmp_path / RUN_ID_FILE).read_text().strip() == first
    other = tmp_path / "other"
    other.mkdir()
    assert pipeline_run_id(other) != first  # another output_dir is another run
    monkeypatch.setenv("WANDB_RUN_ID", "from-env")
    assert pipeline_run_id(tmp_path) == "from-env"


def test_resolved_config_masks_secret_values(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_API_KEY", "abcdefgh12345678")
    config = {"teacher": {"name_or_path": "/models/abcdefgh12345678/llama"}, "tags": ["abcdefgh12345678"], "n": 3}
    assert redacted(config) == {"teacher": {"name_or_path": "/models/***/llama"}, "tags": ["***"], "n": 3}


def test_other_loggers_do_not_import_wandb(tmp_path):
    """csv / none, and the tracking module itself, work where wandb is not installed (the GPU image)."""
    code = (
        "import sys; from pathlib import Path; from train.runtime.trainer import make_logger; "
        f"make_logger({{'kind': 'csv'}}, Path({str(tmp_path)!r}) / 'kd', 'tiny'); "
        f"assert make_logger({{'kind': 'none'}}, Path({str(tmp_path)!r}), 'tiny') is False; "
        "import train.runtime.tracking; assert 'wandb' not in sys.modules, 'wandb imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr[-2000:]
