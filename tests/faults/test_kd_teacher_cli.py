"""A separate KD teacher through the real `python -m train`: a bigger tiny Llama sharing the tiny tokenizer, with a
padded embedding matrix, distills the student; its step-0 KD loss equals forward KL recomputed here with plain torch
from both models' full logits, each document run on its own. A KD teacher whose tokenizer differs by one id stops the
run with exit 2 and one line before any weights load (the tiny teacher is not even trained). The memory pre-flight
refuses a GPU too small with one line, and accepts 80 GB."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from data.batch import shift_labels
from data.corpus import tiny_tokenizer_path
from data.datamodule import DistillDataModule
from models import HybridForCausalLM
from train.config import compose_config, typed_config
from train.runtime.csv_log import read_metrics

from .conftest import cli, last_line, small

PADDED_ROWS = 1024 + 64  # the tiny tokenizer's 1024 ids, padded as larger checkpoints of a family pad theirs


def _kd_teacher(path: Path, tokenizer_dir: Path) -> Path:
    torch.manual_seed(7)
    config = LlamaConfig(
        vocab_size=PADDED_ROWS,
        hidden_size=192,  # the tiny teacher: 128 wide, 4 layers
        intermediate_size=384,
        num_hidden_layers=5,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(path)
    return path


def _per_document(model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(T, V) logits of one packed row, each document (positions restarting at 0) run alone."""
    starts = [*(positions == 0).nonzero().flatten().tolist(), len(ids)]
    return torch.cat([model(input_ids=ids[None, a:b]).logits[0] for a, b in zip(starts, starts[1:], strict=False)])


@torch.no_grad()
def _reference_kd_loss(overrides: list[str], student_dir: Path, kd_dir: Path) -> float:
    """Forward KL(KD teacher || student) per valid token on the KD stage's first batch, over the shared rows."""
    cfg = typed_config(compose_config(overrides))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_path()))
    batch = next(iter(DistillDataModule(cfg.data, tokenizer, phase="kd").train_dataloader()))
    student = HybridForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    teacher = LlamaForCausalLM.from_pretrained(kd_dir, dtype=torch.float32).eval()
    targets = shift_labels(batch["labels"])
    total, count = 0.0, 0
    for row in range(batch["input_ids"].shape[0]):
        ids, positions = batch["input_ids"][row], batch["position_ids"][row]
        q = _per_document(student, ids, positions)[:, :1024].double().log_softmax(-1)
        p = _per_document(teacher, ids, positions)[:, :1024].double().log_softmax(-1)
        valid = targets[row] != -100
        total += float((p.exp() * (p - q)).sum(-1)[valid].sum())
        count += int(valid.sum())
    return total / count


def test_kd_from_a_separate_padded_teacher_equals_the_reference_loss(tmp_path, teacher_cache):
    kd_dir = _kd_teacher(tmp_path / "kd_teacher", tiny_tokenizer_path())
    out = tmp_path / "run"
    overrides = small(
        out,
        teacher_cache,
        "stages=[init,kd,eval]",
        f"kd.teacher_name_or_path={kd_dir}",
        "trainer.log_every_n_steps=1",
        "trainer.device_memory_gib=80",  # the pre-flight runs (and passes) on this CPU run too
    )
    result = cli(*overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "memory pre-flight: kd needs" in (out / ".hydra" / "__main__.log").read_text()
    logged = read_metrics(out / "kd" / "logs" / "metrics.csv")["train/loss"][0]
    assert logged[0] == 0
    reference = _reference_kd_loss(overrides, out / "init" / "student", kd_dir)
    print(f"step-0 KD loss: logged {logged[1]:.7f}, reference {reference:.7f}")
    assert logged[1] == pytest.approx(reference, rel=1e-5)
    report = json.loads((out / "report.json").read_text())
    assert report["kd_teacher"] == str(kd_dir)
    assert report["eval"]["kd teacher"]["params"] == sum(
        p.numel() for p in LlamaForCausalLM.from_pretrained(kd_dir).parameters()
    )
    final = report["eval"]["final student"]
    assert final["kl_to_kd_teacher"] > 0 and 0 <= final["top1_agreement_kd_teacher"] <= 1
    assert final["kl_to_teacher"] > 0  # the init teacher's keys stay
    settings = json.loads((out / "kd" / "settings.json").read_text())
    assert (
        settings["kd.teacher_name_or_path"] == str(kd_dir)
        and "model.safetensors" in settings["kd teacher weight files"]
    )


def test_a_kd_teacher_with_another_tokenizer_stops_before_any_weights_load(tmp_path, forked_cli):
    tokenizer = json.loads((tiny_tokenizer_path() / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = (token for token, i in vocab.items() if i in (100, 101))
    vocab[first], vocab[second] = vocab[second], vocab[first]
    swapped = tmp_path / "swapped_tokenizer"
    swapped.mkdir()
    (swapped / "tokenizer.json").write_text(json.dumps(tokenizer))
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        (swapped / name).write_bytes((tiny_tokenizer_path() / name).read_bytes())
    kd_dir = _kd_teacher(tmp_path / "kd_teacher", swapped)
    cache = tmp_path / "tiny_teacher"
    result = forked_cli(*small(tmp_path / "run", cache, f"kd.teacher_name_or_path={kd_dir}"), timeout=120)
    line = last_line(result)
    assert result.returncode == 2, result.stderr[-2000:]
    assert line.startswith("config error: kd.teacher_name_or_path=") and str(kd_dir) in line and "'tiny'" in line
    assert "id 100 is" in line and "Traceback" not in result.stderr
    assert not cache.exists() or not any(cache.iterdir())  # the tiny teacher was never trained


def test_the_memory_preflight_refuses_a_gpu_too_small_in_one_line(tmp_path, forked_cli):
    cache = tmp_path / "tiny_teacher"
    result = forked_cli(*small(tmp_path / "run", cache, "trainer.device_memory_gib=1"), timeout=120)
    line = last_line(result)
    assert result.returncode == 2, result.stderr[-2000:]
    assert line.startswith("error: memory pre-flight: stage ild needs ~") and "data.micro_batch_size=2 -> 1" in line
    assert not cache.exists() or not any(cache.iterdir())
