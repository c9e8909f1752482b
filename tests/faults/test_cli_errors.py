"""Mistakes a user makes on the command line, in the teacher or in the data, through the real `python -m train`:
each ends before any stage starts, with exit code 2 and one line on stderr naming the key (or file), the bad value
and what is allowed; no traceback unless HYDRA_FULL_ERROR=1. Cases run two at a time, each in its own process forked
after the imports (startup would be nearly all of their time: tests/faults/forked_cli.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, GPT2Config, LlamaConfig, LlamaForCausalLM

from data.corpus import tiny_tokenizer_path

# (overrides, substrings of the one error line)
CONFIG_CASES = {
    "unknown key": (
        ["student.mla.kv_lora_rnk=3"],
        ["student.mla.kv_lora_rnk=3", "did you mean student.mla.kv_lora_rank"],
    ),
    "unknown top-level key": (["epochs=3"], ["epochs=3 is not a config key", "stages"]),
    "unknown key added with +": (["+ild.lr_max=1"], ["ild.lr_max=1 is not a config key", "lr"]),
    "wrong type": (["ild.max_steps=abc"], ["ild.max_steps=abc", "Integer"]),
    "override syntax": (["student.mla_layers=[0,"], ["student.mla_layers=[0,", "key=[a,b]"]),
    "MLA layer index out of range": (["student.mla_layers=[0,9]"], ["student.mla_layers", "[9]", "0..3"]),
    "rank above the teacher's": (["student.mla.kv_lora_rank=97"], ["student.mla.kv_lora_rank=97", "1..96"]),
    "rope dims that do not fit": (["student.mla.qk_rope_head_dim=8"], ["qk_rope_head_dim", "head_dim 32"]),
    "unknown preset": (["conf=tiniest"], ["conf='tiniest'", "tiny", "zebra_1b"]),
    "unknown stage": (["stages=[init,distill]"], ["'distill'", "init, ild, select, kd, dpo, eval, export"]),
    "stages out of order": (["stages=[init,kd,ild]"], ["'ild' after 'kd'", "init, ild, select, kd, dpo, eval, export"]),
    "fault policy": (["faults.nonfinite_loss=ignore"], ["faults.nonfinite_loss='ignore'", "skip | stop"]),
}


def _folder(name: str) -> str:
    return re.sub(r"\W+", "_", name)


def _run_all(forked_cli, cases: dict[str, tuple[list[str], list[str]]], out: Path) -> dict:
    return forked_cli.many(
        {name: [*overrides, f"output_dir={out / _folder(name)}"] for name, (overrides, _) in cases.items()}
    )


def _check(results: dict, cases: dict) -> None:
    for name, result in results.items():
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, (name, result.returncode, result.stderr[-2000:])
        assert lines, name
        message = lines[-1]
        assert "Traceback" not in result.stderr, (name, result.stderr[-2000:])
        for text in cases[name][1]:
            assert text in message, (name, message)
        print(f"{name}: {message}")


def test_config_mistakes_end_in_one_line(tmp_path, forked_cli):
    results = _run_all(forked_cli, CONFIG_CASES, tmp_path)
    _check(results, CONFIG_CASES)
    assert not any((tmp_path / _folder(name) / "init").exists() for name in CONFIG_CASES)  # no stage started


def test_full_traceback_on_request(tmp_path, forked_cli):
    result = forked_cli("stages=[init,kd,ild]", f"output_dir={tmp_path}", env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    """Broken and odd teacher directories (tiny shapes, random weights)."""
    root = tmp_path_factory.mktemp("teachers")
    shape = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        architectures=["LlamaForCausalLM"],
    )
    names = ("not_a_model", "gpt2", "damaged", "short_context", "nan", "no_tokenizer")
    dirs = {name: root / name for name in names}
    dirs["not_a_model"].mkdir()
    (dirs["not_a_model"] / "README.md").write_text("my notes")
    GPT2Config(n_layer=2, n_embd=64, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(dirs["gpt2"])
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(dirs["damaged"])
    weights = dirs["damaged"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy that stopped halfway
    LlamaConfig(**shape, max_position_embeddings=64).save_pretrained(dirs["short_context"])
    # NaN bytes inside the data of an intact file (a bad disk, a broken conversion): it loads without an error.
    LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(dirs["nan"])
    state = load_file(dirs["nan"] / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, dirs["nan"] / "model.safetensors", metadata={"format": "pt"})
    AutoTokenizer.from_pretrained(str(tiny_tokenizer_path())).save_pretrained(dirs["nan"])  # reaches the load
    LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(dirs["no_tokenizer"])  # weights only: no tokenizer
    return dirs


def test_teacher_mistakes_end_in_one_line(tmp_path, teachers, forked_cli):
    cases = {
        "missing path": (["teacher.name_or_path=/no/such/teacher"], ["'/no/such/teacher'", "local directory"]),
        # a relative path that does not exist looks like a Hub id: offline, it is named with the Hub's answer
        "missing relative path": (["teacher.name_or_path=checkpoints/my-teacher"], ["checkpoints/my-teacher", "Hub"]),
        "not a model": ([f"teacher.name_or_path={teachers['not_a_model']}"], ["not_a_model", "config.json"]),
        "unsupported architecture": (
            [f"teacher.name_or_path={teachers['gpt2']}"],
            ["GPT2LMHeadModel", "not supported", "LlamaForCausalLM", "Qwen2ForCausalLM"],
        ),
        "damaged safetensors": ([f"teacher.name_or_path={teachers['damaged']}"], ["model.safetensors", "damaged"]),
        "non-finite weights": (
            [f"teacher.name_or_path={teachers['nan']}", "student.mla_layers=[0]"],
            ["non-finite values", "model.layers.1.mlp.up_proj.weight", "damaged"],
        ),
        "no tokenizer": (
            [f"teacher.name_or_path={teachers['no_tokenizer']}", "student.mla_layers=[0]"],
            ["no_tokenizer", "tokenizer.json", "data.tokenizer"],
        ),
        "sequence longer than the teacher's positions": (
            [f"teacher.name_or_path={teachers['short_context']}", "data.seq_len=128"],
            ["data.seq_len=128", "max_position_embeddings 64"],
        ),
    }
    _check(_run_all(forked_cli, cases, tmp_path), cases)


def test_non_finite_teacher_weights_are_named_when_loading(teachers):
    from models.teachers import TeacherLoadError, load_teacher

    with pytest.raises(TeacherLoadError, match=r"non-finite values \(NaN or inf\) in model.layers.1.mlp.up_proj"):
        load_teacher(str(teachers["nan"]))


def test_a_report_with_nan_is_still_json(tmp_path):
    """A NaN loss in the report becomes null: bare NaN is not JSON (strict readers refuse the whole file)."""
    import json

    from train.stages.context import write_json

    report = {"eval": {"student": {"loss": float("nan"), "ok": 1.5, "inf": [float("inf")]}}}
    write_json(tmp_path / "report.json", report)
    text = (tmp_path / "report.json").read_text()
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name}")) == {
        "eval": {"student": {"loss": None, "ok": 1.5, "inf": [None]}}
    }


def test_damaged_teacher_weights_fail_clearly_when_loading(teachers):
    """The same damage found by the loader itself (validation skipped), one line naming the file."""
    from models.teachers import TeacherLoadError, load_teacher

    with pytest.raises(TeacherLoadError, match="model.safetensors is damaged"):
        load_teacher(str(teachers["damaged"]))


def _truncated_gzip() -> bytes:
    import gzip

    whole = gzip.compress(b"".join(b'{"text": "row %d of some text"}\n' % i for i in range(2000)))
    return whole[: len(whole) // 2]  # an interrupted download


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    files = {
        "missing column": ("rows.jsonl", b'{"content": "hello world"}\n'),
        "empty file": ("empty.jsonl", b""),
        "nothing left after filtering": ("blank.jsonl", b'{"text": ""}\n{"text": "   "}\n{"text": "\\n"}\n'),
        "undecodable bytes": ("notes.txt", b"a good line\nthen \xff\xfe garbage\n"),
        # half the rows use another key: before, they were dropped as blank without a word
        "rows without the content key": (
            "mixed.jsonl",
            b"".join(
                (b'{"text": "row %d of real text"}\n' if i % 2 == 0 else b'{"body": "row %d under another key"}\n') % i
                for i in range(40)
            ),
        ),
        "truncated gzip": ("part.jsonl.gz", _truncated_gzip()),
        "a line that is not JSON": ("lines.jsonl", b'{"text": "fine"}\n{"text": "cut off\n{"text": "fine"}\n'),
        "a broken JSON document": ("doc.json", b'[\n  {"text": "one"},\n  {"text": "two"\n]\n'),
    }
    out = {}
    for name, (file, content) in files.items():
        (root / file).write_bytes(content)
        out[name] = root / file
    return out


def test_data_mistakes_end_in_one_line(tmp_path, data_files, teacher_cache, forked_cli):
    def source(path: Path, **extra) -> str:
        fields = ",".join([f"name_or_path:'{path}'", *(f"{k}:{v}" for k, v in extra.items())])
        return f"data.sources=[{{{fields}}}]"

    teacher = [f"teacher.tiny.cache_dir={teacher_cache}", "teacher.tiny.train_steps=10"]
    cases = {
        "missing column": (
            [source(data_files["missing column"])],
            ["rows.jsonl", "no 'text' or 'messages' column", "content"],
        ),
        "empty file": ([source(data_files["empty file"])], ["empty.jsonl is empty"]),
        "nothing left after filtering": (
            [source(data_files["nothing left after filtering"])],
            ["blank.jsonl", "no documents left after filtering", "3 rows"],
        ),
        "undecodable bytes": ([source(data_files["undecodable bytes"])], ["notes.txt", "line 2", "not valid UTF-8"]),
        "rows without the content key": (
            [source(data_files["rows without the content key"])],
            ["mixed.jsonl", "20 of 40 rows", "first at row 1", "data.max_bad_fraction=0.0"],
        ),
        "truncated gzip": ([source(data_files["truncated gzip"])], ["part.jsonl.gz", "damaged or truncated"]),
        "a line that is not JSON": (
            [source(data_files["a line that is not JSON"])],
            ["lines.jsonl", "line 2 is not valid JSON", "column"],
        ),
        "a broken JSON document": (
            [source(data_files["a broken JSON document"])],
            ["doc.json", "line 4 is not valid JSON", "delimiter"],
        ),
    }
    cases = {name: (overrides + teacher, expected) for name, (overrides, expected) in cases.items()}
    _check(_run_all(forked_cli, cases, tmp_path), cases)


def test_unreadable_data_config_in_a_saved_run_is_named(tmp_path):
    """A saved `.hydra/config.yaml` edited by hand still validates through the same checks (one line)."""
    from omegaconf import OmegaConf

    from train.config import ConfigError, compose_config, validate_config

    plain = OmegaConf.create(OmegaConf.to_container(compose_config([]), resolve=True))
    plain.data.seq_len = "long"
    with pytest.raises(ConfigError) as info:
        validate_config(plain)
    assert "data.seq_len" in str(info.value) and "\n" not in str(info.value)
    json.dumps(str(info.value))
