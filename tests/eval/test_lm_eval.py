"""The exported student under lm-evaluation-harness (`--model hf`, trust_remote_code), offline, on a local task."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from data.corpus import tiny_tokenizer_path
from models import HybridConfig, HybridForCausalLM

lm_eval = pytest.importorskip("lm_eval")  # in the dev extra, so CI runs this test

FACTS = [
    {"question": "The capital of Bellinmi is", "choices": [" Orne", " Darne", " Nefa"], "answer": 0},
    {"question": "24 plus 8 is", "choices": [" 32", " 31", " 5"], "answer": 0},
    {"question": "Saren lives in", "choices": [" Orfa", " Loto", " the market in Mimi"], "answer": 0},
    {"question": "Totes is a", "choices": [" miller", " singer", " baker who sells bread"], "answer": 0},
    {"question": "One Monday morning, Mone walked to the", "choices": [" market", " library"], "answer": 1},
]


def _task(tmp_path) -> str:
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in FACTS))
    (tmp_path / "tiny_facts.yaml").write_text(
        "task: tiny_facts\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return str(tmp_path)


def _student(tmp_path) -> str:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_path()))
    config = HybridConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mixer_types=["mla", "mamba"],
        mla=dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16),
        mamba=dict(d_state=16, headdim=16, chunk_size=8),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path / "student"
    HybridForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _loglikelihoods(student: str, tasks_dir: str, batch_size: int) -> tuple[float, list[float]]:
    from lm_eval.tasks import TaskManager

    result = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={student},trust_remote_code=True",
        tasks=["tiny_facts"],
        task_manager=TaskManager(include_path=tasks_dir),
        batch_size=batch_size,
        device="cpu",
        log_samples=True,
    )
    samples = sorted(result["samples"]["tiny_facts"], key=lambda s: s["doc_id"])
    values = [float(resp[0][0]) for s in samples for resp in s["resps"]]
    return result["results"]["tiny_facts"]["acc,none"], values


def test_exported_student_under_lm_eval_is_batch_invariant(tmp_path):
    student, tasks = _student(tmp_path), _task(tmp_path)
    acc_1, single = _loglikelihoods(student, tasks, batch_size=1)
    acc_4, batched = _loglikelihoods(student, tasks, batch_size=4)
    assert len(single) == sum(len(f["choices"]) for f in FACTS)
    assert 0.0 <= acc_1 <= 1.0 and acc_1 == acc_4
    # Padded batches (choices of different lengths) must score exactly what single requests score.
    assert torch.allclose(torch.tensor(batched), torch.tensor(single), atol=1e-4), (batched, single)
    assert all(v < 0 for v in single)
