"""Security: teacher, tokenizer and datasets never run code they ship unless the user sets trust_remote_code;
checkpoints load with weights_only (a pickle that runs code is refused); credentials in the environment (W&B key,
HF token) appear in no log, config, report or checkpoint of a run."""

from __future__ import annotations

import json
import logging
import os
import pathlib
from pathlib import Path

import pytest
import torch

from .conftest import SECRETS, cli

CODE = """import os, pathlib
pathlib.Path(os.environ["MARKER"]).write_text("the shipped code ran")
"""


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "code_ran"
    monkeypatch.setenv("MARKER", str(path))
    return path


def _repo_with_code(folder: Path) -> Path:
    """A model repository whose config, model and tokenizer classes are its own Python files (auto_map)."""
    folder.mkdir()
    config = {
        "model_type": "shipped",
        "architectures": ["ShippedForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_shipped.ShippedConfig",
            "AutoModelForCausalLM": "modeling_shipped.ShippedForCausalLM",
        },
    }
    tokenizer = {
        "tokenizer_class": "ShippedTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_shipped.ShippedTokenizer", None]},
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    for name in ("configuration_shipped", "modeling_shipped", "tokenization_shipped"):
        (folder / f"{name}.py").write_text(CODE)
    return folder


def test_teacher_code_does_not_run_without_trust_remote_code(tmp_path, marker):
    repo = _repo_with_code(tmp_path / "teacher")
    result = cli(f"teacher.name_or_path={repo}", f"output_dir={tmp_path / 'out'}", timeout=120)
    message = result.stderr.strip().splitlines()[-1]
    print(message)
    assert result.returncode == 2 and "teacher.trust_remote_code=true" in message
    from models.teachers import load_teacher

    with pytest.raises(ValueError, match="trust_remote_code"):
        load_teacher(str(repo))
    assert not marker.exists()


def test_tokenizer_and_dataset_code_does_not_run(tmp_path, marker):
    from data.build import load_tokenizer
    from data.config import DataConfig, SourceConfig
    from data.sources import DataSourceError, load_source

    repo = _repo_with_code(tmp_path / "tokenizer")
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_tokenizer(DataConfig(tokenizer=str(repo)))
    # A dataset folder with a loading script: datasets no longer runs scripts; ours reads data files only.
    scripted = tmp_path / "scripted"
    scripted.mkdir()
    (scripted / "scripted.py").write_text(CODE)
    for fmt in (None, "hub"):
        with pytest.raises(DataSourceError):
            load_source(SourceConfig(str(scripted), format=fmt))
    assert not marker.exists()


class Payload:
    """Unpickling this calls Path.write_text: what a tampered checkpoint could do with a full unpickler."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.write_text, (pathlib.Path(self.path), "the checkpoint ran code")


def test_checkpoints_load_with_weights_only(tmp_path, marker):
    from train.runtime.checkpoint_io import AtomicCheckpointIO
    from train.runtime.faults import CheckpointError

    io = AtomicCheckpointIO()
    good = tmp_path / "good.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 3, "loops": {"a": [1, 2.0, "x"]}}, good)
    assert io.load_checkpoint(good)["global_step"] == 3
    bad = tmp_path / "tampered.ckpt"
    torch.save({"state_dict": {}, "payload": Payload(str(marker))}, bad)
    with pytest.raises(CheckpointError, match="tampered.ckpt"):
        io.load_checkpoint(bad)
    assert not marker.exists()


def test_secrets_stay_out_of_logs_configs_reports_and_checkpoints(reference, tmp_path):
    out, result = reference
    texts = {"stdout": result.stdout.encode(), "stderr": result.stderr.encode()}
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.suffix == ".ckpt" for p in files)
    assert any("wandb" in p.parts for p in files)  # the W&B logger ran (offline), with the key in its environment
    texts |= {str(p): p.read_bytes() for p in files}
    for name, value in SECRETS.items():
        leaks = [where for where, data in texts.items() if value.encode() in data]
        assert not leaks, (name, leaks)
    # Where a message does carry one (here a path the user typed), the CLI prints it masked.
    token = SECRETS["HF_TOKEN"]
    result = cli(f"teacher.name_or_path=/models/{token}", f"output_dir={tmp_path}", env=SECRETS, timeout=120)
    assert result.returncode == 2 and token not in result.stderr and "/models/***" in result.stderr


def test_log_records_are_redacted(monkeypatch):
    from train.runtime.redact import RedactingFilter

    monkeypatch.setenv("MY_SERVICE_API_KEY", "abcdefgh12345678")
    monkeypatch.setenv("SHORT_TOKEN", "1")  # too short to be a credential: left alone
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "key=%s token=%s", ("abcdefgh12345678", "1"), None)
    RedactingFilter().filter(record)
    assert record.getMessage() == "key=*** token=1"
    assert os.environ["MY_SERVICE_API_KEY"] == "abcdefgh12345678"


def test_an_exported_student_loads_without_a_remote_code_prompt_where_our_package_is_imported(tmp_path):
    """transformers 5 reads config.json before the tokenizer files, so `AutoTokenizer.from_pretrained(student)`
    asked "run the custom code? [y/N]" for our students (their config class travels as auto_map code). Importing
    `models` registers the student's config and model with the Auto classes: the tokenizer loads with no prompt
    and the model without trust_remote_code, both through our installed code rather than the folder's copy."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from data.corpus import tiny_tokenizer_path
    from tests.models.tiny import tiny_model
    from train.stages.context import save_student

    folder = tmp_path / "student"
    save_student(tiny_model(), folder, AutoTokenizer.from_pretrained(str(tiny_tokenizer_path())))
    assert "AutoConfig" in json.loads((folder / "config.json").read_text())["auto_map"]  # plain transformers: code
    script = f"""
import builtins
def no_prompt(*args, **kwargs):
    raise SystemExit("prompted: " + str(args[0] if args else "")[:200])
builtins.input = no_prompt
import models
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})
model = AutoModelForCausalLM.from_pretrained({str(folder)!r})
assert type(model) is models.HybridForCausalLM, type(model)
print("loaded", type(tokenizer).__name__, tokenizer("def f():")["input_ids"][:3])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "loaded" in result.stdout, result.stdout + result.stderr[-2000:]
