"""Reruns into an existing output_dir (train/runtime/rerun.py): a stage continues only under the settings it started
with; a changed setting stops the run with one line (exit 2) before anything loads or is written, naming the keys
and `restart_from`; `restart_from=<stage>` moves that stage and the later ones aside and redoes them, once; values
that cannot change a result may differ; a first stage that needs a student the folder lacks is refused at once."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from train.config import ConfigError, compose_config, typed_config
from train.runtime.rerun import check_rerun, stage_settings

from .conftest import cli, last_line, small


@pytest.fixture(scope="module")
def finished(tmp_path_factory, teacher_cache):
    """init -> ild finished once with student.mla_layers=[0,2] (the tiny preset's map)."""
    out = tmp_path_factory.mktemp("rerun") / "run"
    result = cli(*small(out, teacher_cache, "stages=[init,ild]"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def _mixers(student_dir) -> list[str]:
    return json.loads((student_dir / "config.json").read_text())["mixer_types"]


def test_a_changed_layer_map_is_refused_and_the_saved_config_kept(finished, tmp_path, teacher_cache, forked_cli):
    out = _copy(finished, tmp_path)
    saved = (out / ".hydra" / "config.yaml").read_text()
    result = forked_cli(*small(out, teacher_cache, "stages=[init,ild,kd]", "student.mla_layers=[1,3]"))
    assert result.returncode == 2, result.stderr[-2000:]
    line = last_line(result)
    assert "stage init" in line and "student.mla_layers: [0, 2] -> [1, 3]" in line and "restart_from=init" in line
    assert "new output_dir" in line
    assert (out / ".hydra" / "config.yaml").read_text() == saved  # refused before Hydra rewrites it
    assert not (out / "kd").exists()


def test_restart_from_redoes_the_stage_and_the_later_ones_once(finished, tmp_path, teacher_cache):
    out = _copy(finished, tmp_path)
    old_map = _mixers(out / "ild" / "student")
    args = small(out, teacher_cache, "stages=[init,ild]", "student.mla_layers=[1,3]", "restart_from=init")
    result = cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _mixers(out / "ild" / "student") != old_map
    assert _mixers(out / "ild" / "student")[1] == "mla" and _mixers(out / "ild" / "student")[0] == "mamba"
    (aside,) = (out / "replaced").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == ["ild", "init"]
    assert _mixers(aside / "ild" / "student") == old_map  # nothing lost
    done = (out / "ild" / "done.json").stat().st_mtime_ns
    again = cli(*args)  # the same command again (after a preemption, say): continues, no second restart
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(list((out / "replaced").iterdir())) == 1
    assert (out / "ild" / "done.json").stat().st_mtime_ns == done
    plain = cli(*small(out, teacher_cache, "stages=[init,ild]", "student.mla_layers=[1,3]"))  # and without it
    assert plain.returncode == 0, plain.stderr[-3000:]


def test_a_changed_stage_setting_names_that_stage(finished, tmp_path, teacher_cache, forked_cli):
    out = _copy(finished, tmp_path)
    result = forked_cli(*small(out, teacher_cache, "stages=[init,ild]", "ild.lr=0.5"))
    assert result.returncode == 2
    line = last_line(result)
    assert "stage ild" in line and "ild.lr: 0.001 -> 0.5" in line and "restart_from=ild" in line


def test_settings_that_cannot_change_a_result_may_change(finished, tmp_path, teacher_cache):
    out = _copy(finished, tmp_path)
    extra = (
        "eval.max_batches=3",
        "trainer.log_every_n_steps=1",
        "ild.checkpoint_every_n_steps=3",
        "data.num_workers=1",
        "student.document_masking=auto",
    )
    result = cli(*small(out, teacher_cache, "stages=[init,ild]", *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage ild: finished earlier, skipped" in result.stdout + result.stderr


def test_a_swapped_teacher_behind_the_same_path_is_refused(finished, tmp_path, teacher_cache, forked_cli):
    from dataclasses import asdict

    from transformers import LlamaConfig, LlamaForCausalLM

    from train.runtime.tiny_teacher import tiny_teacher_dir

    cfg = typed_config(compose_config(small(tmp_path / "x", teacher_cache)))
    source = tiny_teacher_dir(asdict(cfg.teacher.tiny), cfg.data)  # trained by the `finished` run
    teacher = tmp_path / "teacher"
    shutil.copytree(source, teacher)
    out = tmp_path / "run"
    base = small(out, teacher_cache, f"teacher.name_or_path={teacher}", "stages=[init]")
    assert cli(*base).returncode == 0
    config = LlamaConfig.from_pretrained(teacher)
    config.intermediate_size += 8  # another model, same files by name
    LlamaForCausalLM(config).save_pretrained(teacher)
    result = forked_cli(*base)
    assert result.returncode == 2 and "teacher weight files" in last_line(result), result.stderr[-2000:]


def test_a_first_stage_without_a_student_is_refused_before_anything_loads(tmp_path, forked_cli):
    cache = tmp_path / "teacher_cache"  # a fresh cache: a run that got as far as the teacher would train one
    result = forked_cli(*small(tmp_path / "run", cache, "stages=[eval]"), timeout=60)
    assert result.returncode == 2
    assert "eval starts from a student" in last_line(result) and "init" in last_line(result)
    assert not cache.exists()


@pytest.mark.parametrize("where", ["file", "under_file", "read_only"])
def test_an_output_dir_that_cannot_hold_a_run_is_refused(tmp_path, where, forked_cli):
    blocker = tmp_path / "blocker"
    if where == "read_only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        blocker.mkdir()
        blocker.chmod(0o500)
        out = blocker / "run"
    else:
        blocker.write_text("not a folder")
        out = blocker if where == "file" else blocker / "run"
    result = forked_cli(*small(out, tmp_path / "cache"), timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert last_line(result).startswith("config error: output_dir=") and "Traceback" not in result.stderr


def test_restart_from_must_be_one_of_the_stages(tmp_path, forked_cli):
    args = small(tmp_path / "run", tmp_path / "cache", "stages=[init,ild]", "restart_from=kd")
    result = forked_cli(*args, timeout=60)
    assert (
        result.returncode == 2 and "restart_from='kd'" in last_line(result) and "['init', 'ild']" in last_line(result)
    )


def test_an_unwritable_output_dir_is_named(tmp_path, monkeypatch):
    """The permission answer itself (root, who runs these tests here, may write anywhere)."""
    from train.config import check_output_dir

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match=r"output_dir=.* not writable by this user"):
        check_output_dir(str(tmp_path / "run"))


def test_a_stage_depends_on_the_settings_of_the_stages_before_it(tmp_path):
    cfg = typed_config(compose_config([f"output_dir={tmp_path}", "stages=[init,ild,kd,eval]"]))
    kd, ild, eval_ = (stage_settings(cfg, s) for s in ("kd", "ild", "eval"))
    assert "ild.lr" in kd and "kd.lr" in kd and "kd.lr" not in ild
    assert kd["stages before it"] == ["init", "ild"]
    assert "student.mla_layers" in ild and "data.seq_len" in ild and "seed" in ild
    assert not any(k.startswith(("eval.", "logger.", "output_dir")) for k in eval_)
    assert "kd.use_triton" not in kd and "kd.val_every_n_steps" not in kd  # same numbers either way


def test_dropping_an_earlier_stage_changes_the_later_ones(tmp_path):
    out = tmp_path / "run"
    before = typed_config(compose_config([f"output_dir={out}", "stages=[init,ild,kd]"]))
    (out / "kd").mkdir(parents=True)
    (out / "kd" / "settings.json").write_text(json.dumps(stage_settings(before, "kd")))
    (out / "init" / "student").mkdir(parents=True)
    (out / "init" / "done.json").write_text("{}")
    after = typed_config(compose_config([f"output_dir={out}", "stages=[kd]"]))
    with pytest.raises(ConfigError, match=r"stage kd .*stages before it: \[\"init\", \"ild\"\] -> \[\]"):
        check_rerun(after, out)


def test_a_run_recorded_before_a_key_existed_resumes_under_its_old_behaviour(tmp_path):
    """settings.json of an older run lacks keys added since (rerun.ADDED_KEYS): they compare as the value that
    reproduces that run, so it resumes with those values passed and the new defaults name what to pass."""
    from train.runtime.rerun import ADDED_KEYS

    out = tmp_path / "run"
    old = stage_settings(typed_config(compose_config([f"output_dir={out}"])), "init")
    assert set(ADDED_KEYS) <= set(old)  # every added key is part of what the stage records
    for key in ADDED_KEYS:
        del old[key]
    (out / "init").mkdir(parents=True)
    (out / "init" / "settings.json").write_text(json.dumps(old))
    with pytest.raises(ConfigError, match=r'student.mamba.gate_init: "random" -> "constant"'):
        check_rerun(typed_config(compose_config([f"output_dir={out}"])), out)
    as_before = ["student.mamba.gate_init=random", "student.calibration_rows=0"]
    check_rerun(typed_config(compose_config([f"output_dir={out}", *as_before])), out)


def test_a_damaged_student_of_a_finished_stage_is_named(finished, tmp_path, teacher_cache, forked_cli):
    out = _copy(finished, tmp_path)
    weights = out / "ild" / "student" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy that stopped early
    result = forked_cli(*small(out, teacher_cache, "stages=[init,ild,kd]"))
    assert result.returncode == 4, result.stderr[-2000:]
    line = last_line(result)
    assert "the student saved by stage ild" in line and str(out / "ild" / "student") in line
    assert "restart_from=ild" in line and "Traceback" not in result.stderr


def test_more_cpu_processes_than_cores_are_announced(tmp_path, caplog):
    from train.config import validate_config

    cores = os.cpu_count() or 1
    cfg = compose_config([f"output_dir={tmp_path}", f"trainer.devices={cores + 2}"])
    with caplog.at_level("WARNING"):
        validate_config(cfg)
    n = cores + 2
    assert f"trainer.devices={n} on the CPU starts {n} training processes on {cores} cores" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        validate_config(compose_config([f"output_dir={tmp_path}", f"trainer.devices={cores}"]))
    assert "training processes" not in caplog.text
