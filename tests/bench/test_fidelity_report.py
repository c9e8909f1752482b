"""bench.fidelity's row commands and docs/fidelity.md rendering, from a synthetic results file (no training)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pytest

from bench import fidelity
from bench.fidelity import ROWS, Budget, row_command
from bench.fidelity_report import NOTES, render


def _held(loss: float, agree: float, kv: int) -> dict:
    return {
        "loss": loss,
        "perplexity": 2.718**loss,
        "kl_to_teacher": loss - 1.5,
        "top1_agreement": agree,
        "kv_bytes_per_token": kv,
        "tokens": 1000,
    }


def _entry(loss: float, kv: int = 2560) -> dict:
    return {
        "what": "x",
        "exit_code": 0,
        "tokens": {"ild": 2_000_000, "kd": 10_000_000},
        "stage_seconds": {"ild": 60.0, "kd": 300.0},
        "mla_layers": [0, 4, 8, 12, 17, 21, 25, 29],
        "mixture_eval": {"teacher": {"loss": 1.6}},
        "curve": {
            "ild_tokens": 2e6,
            "kd_tokens_per_step": 32768.0,
            "val/kd/ce": [[99, 2.2], [199, 2.0]],
            "val/kd/top1_agreement": [[99, 0.7], [199, 0.75]],
        },
        "heldout_packages": {
            "teacher": _held(1.6, 1.0, 23040),
            "initialized": _held(4.0, 0.3, kv),
            "final": _held(loss, 0.8, kv),
            "eval_seconds": 12.0,
            "samples": {"chat": [{"prompt": "Hi", "teacher": "Hello", "student": "Hello!"}]},
        },
    }


def test_render_tables_plots_and_kept_notes(tmp_path):
    results = tmp_path / "fidelity_smollm2_h200.json"
    rows = {"main": _entry(1.72), "no_ild": _entry(1.80), "mla4": _entry(1.90, 1280), "uniform": {"what": "u"}}
    results.write_text(json.dumps({"card": "NVIDIA H200", "date": "2026-12-04T00:00:00", "results": rows}))
    doc = tmp_path / "fidelity.md"
    doc.write_text("old generated text\n" + NOTES + "\nmy reading of the numbers\n")
    render([results], doc)
    text = doc.read_text()
    assert "| final student | 1.7200 |" in text and "+7.5 %" in text  # 1.72 / 1.6 - 1
    assert "| no_ild |" in text and "+4.7 %" in text  # against main: 1.80 / 1.72 - 1
    assert "| uniform | u |" in text and "not finished" in text
    assert "old generated text" not in text and text.endswith("my reading of the numbers\n")
    assert (tmp_path / "fidelity_smollm2_h200_curve.png").stat().st_size > 0
    assert (tmp_path / "fidelity_smollm2_h200_kv_quality.png").stat().st_size > 0
    assert "*student:*" in text and "Hello!" in text


def test_render_an_unevaluated_main_row_shows_its_eval_stage_and_last_validation(tmp_path):
    main = _entry(1.72)
    del main["heldout_packages"]  # trained, its held-out-packages evaluation cut by a deadline
    main["status"] = "stopped (exit -15)"
    main["mixture_eval"] = {"teacher": _held(1.5, 1.0, 23040), "final student": _held(2.1, 0.66, 2560)}
    main["stage_seconds"]["eval"] = 46.6
    results = tmp_path / "fidelity_smollm2_h100.json"
    rows = {"main": main, "teacher_cache": {"what": "c", "status": "stopped", "curve": {"val/kd/ce": [[299, 2.07]]}}}
    results.write_text(json.dumps({"card": "NVIDIA H100", "date": "2026-12-07T00:00:00", "results": rows}))
    doc = tmp_path / "fidelity.md"
    render([results], doc)
    text = doc.read_text()
    assert "eval stage (46.6 s)" in text and "| final student | 2.1000 |" in text and "+40.0 %" in text
    assert "| teacher_cache | c |" in text and "KD-val CE 2.0700 at KD step 300" in text


def test_render_rows_recorded_without_main(tmp_path):
    # PART=rows: the GDN rows reuse none of main's stages and may be the only rows of a card's results file
    results = tmp_path / "fidelity_smollm2_h100.json"
    rows = {"mla_gdn": _entry(1.9)}  # the only row of its file
    results.write_text(json.dumps({"card": "NVIDIA H100", "date": "2026-12-08T00:00:00", "results": rows}))
    doc = tmp_path / "fidelity.md"
    render([results], doc)
    text = doc.read_text()
    assert "| mla_gdn | x |" in text and "| 1.9000 |" in text


def test_a_row_counts_the_tokens_of_the_main_stages_it_reuses(tmp_path):
    rows = tmp_path / "rows"
    for name, report in (("main", {"ild": {"tokens_seen": 300}, "kd": {"tokens_seen": 900}}),
                         ("reuses", {"kd": {"tokens_seen": 700}}), ("own", {"kd": {"tokens_seen": 800}})):  # fmt: skip
        (rows / name).mkdir(parents=True)
        (rows / name / "report.json").write_text(json.dumps(report))
    (rows / "reuses" / "ild").mkdir()
    (rows / "reuses" / "ild" / "done.json").write_text("{}")  # copied from main by _reuse_stage
    assert fidelity.row_summary(rows / "reuses")["tokens"] == {"ild": 300, "kd": 700}
    assert fidelity.row_summary(rows / "own")["tokens"] == {"ild": 0, "kd": 800}  # no ILD: none counted
    assert fidelity.row_summary(rows / "main")["tokens"] == {"ild": 300, "kd": 900}


def test_rows_get_equal_tokens_and_main_map():
    args = argparse.Namespace(teacher="/t.gguf", seq_len=2048, eval_rows=128, samples=4)
    budget = Budget(100, 400, 300, ["data.seq_len=2048"])
    main, evaluate = row_command("main", ROWS["main"], args, budget, Path("/o"), None)
    assert main[1:3] == ["-m", "train"]
    assert "ild.max_steps=100" in main and "kd.max_steps=400" in main and "conf=smollm2_135m" in main
    assert evaluate[1:5] == ["-m", "bench.fidelity", "--evaluate-row", "main"]  # its own process, after training
    [baseline, _] = row_command("baseline", ROWS["baseline"], args, budget, Path("/o"), None)
    assert "kd.max_steps=300" in baseline  # the ablation budget
    assert baseline[-1] == "stages=[init,ild,select,kd,export]" and main[-1] != baseline[-1]  # eval stage: main's
    [no_ild, _] = row_command("no_ild", ROWS["no_ild"], args, budget, Path("/o"), [0, 9, 29])
    assert "kd.max_steps=400" in no_ild and "student.mla_layers=[0,9,29]" in no_ild  # ILD's steps move to KD
    assert no_ild[-2] == "stages=[init,kd,export]"  # after the row's own stages override
    with pytest.raises(RuntimeError, match="main row first"):
        row_command("no_ild", ROWS["no_ild"], args, budget, Path("/o"), None)
    # offline KD: the cache writer first, with the training run's overrides (the cache is keyed by them)
    writer, cached, _ = row_command("teacher_cache", ROWS["teacher_cache"], args, budget, Path("/o"), None)
    assert writer[1:3] == ["-m", "train.teacher_cache"] and cached[1:3] == ["-m", "train"]
    assert writer[3:] == cached[3:] and "kd.teacher_cache='/o/rows/teacher_cache/teacher_cache'" in cached


def _stage_writer(row_dir: Path, stages: list[str], seconds: float, code: int = 0) -> list[str]:
    """A stand-in row command: writes each stage's done.json after `seconds`, logs its start, exits `code`."""
    script = (
        "import pathlib, sys, time\n"
        f"row = pathlib.Path({str(row_dir)!r})\n"
        "row.mkdir(parents=True, exist_ok=True)\n"
        "(row / 'started').write_text(str(time.monotonic()))\n"
        f"for stage in {stages!r}:\n"
        f"    time.sleep({seconds})\n"
        "    (row / stage).mkdir(exist_ok=True)\n"
        "    (row / stage / 'done.json').write_text('{}')\n"
        f"sys.exit({code})\n"
    )
    return [sys.executable, "-c", script]


def test_rows_start_when_the_main_stages_they_reuse_are_done(tmp_path, monkeypatch):
    """The row runner's scheduling, with stand-in commands (training itself is tested elsewhere): rows wait for
    the main stages they reuse, at most `parallel` run at once, every row is reported once, the deadline stops
    what runs and what has not started."""
    out = tmp_path / "out"

    def commands(name, row, args, budget, out_dir, main_map):
        row_dir = out_dir / "rows" / name
        if name == "main":
            return [_stage_writer(row_dir, ["init", "ild", "select"], 0.3), _stage_writer(row_dir, ["kd"], 4.0)]
        if name in ("jsd", "mla4"):
            return [_stage_writer(row_dir, ["kd"], 60.0)]  # still running at the deadline
        return [_stage_writer(row_dir, ["kd"], 0.2, code=3 if name == "uniform" else 0)]

    monkeypatch.setattr(fidelity, "row_command", commands)
    args = argparse.Namespace(parallel=2)
    exits: dict[str, tuple] = {}

    def on_exit(name, code, why=None):
        assert name not in exits, f"{name} reported twice"
        exits[name] = (code, why)

    (out / "rows" / "mla12").mkdir(parents=True)  # trained and evaluated by an earlier call
    (out / "rows" / "mla12" / "heldout_eval.json").write_text("{}")
    names = ["reverse_kl", "main", "uniform", "jsd", "mla4", "no_ild", "mla12"]
    fidelity.run_rows(names, args, Budget(1, 5, 2), out, time.monotonic() + 10, on_exit)
    rows = out / "rows"
    assert exits["main"] == (0, None) and exits["reverse_kl"] == (0, None)
    assert exits["uniform"][0] == 3  # its failing exit code
    for name, last_reused in (("reverse_kl", "select"), ("uniform", "ild")):  # after the stages they reuse
        assert (rows / "main" / last_reused / "done.json").stat().st_mtime <= (rows / name / "started").stat().st_mtime
        assert (rows / name / last_reused / "done.json").exists()  # main's stage copied in
    # beside main's KD, not after it
    assert (rows / "reverse_kl" / "started").stat().st_mtime < (rows / "main" / "kd" / "done.json").stat().st_mtime
    assert exits["jsd"][0] not in (0, None) and exits["mla4"][0] not in (0, None)  # SIGTERM at the deadline
    assert exits["no_ild"] == (None, "not started before the deadline: rerun the same command")  # two slots taken
    assert exits["mla12"] == (0, None) and not (rows / "mla12" / "started").exists()  # recorded, not rerun
    budgets = {name: json.loads((rows / name / "budget.json").read_text()) for name in ("main", "reverse_kl")}
    assert budgets == {"main": {"ild_steps": 1, "kd_steps": 5}, "reverse_kl": {"ild_steps": 1, "kd_steps": 2}}
