"""Initialization on the real teacher's weights: the lossless conversion reproduces it, the Zebra-like one is
reported layer by layer. Measured numbers (CPU, fp32, the 80-token TEXT): teacher loss 2.573."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.init import convert_teacher

ZEBRA_MLA = dict(kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64, q_lora_rank=None)
ZEBRA_LAYERS = [0, 4, 8, 12, 16, 20, 24, 29]
UNIFORM = math.log(49152)  # 10.80: the loss of predicting every token with equal probability


def _loss(model, ids) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        logits = model(ids).logits
    return F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item(), logits


def test_lossless_all_mla_reproduces_smollm2(smollm2, text_ids):
    teacher, spec, _ = smollm2
    student, report = convert_teacher(teacher, spec, mla_layers="all", lossless=True)
    teacher_loss, expected = _loss(teacher, text_ids)
    student_loss, got = _loss(student, text_ids)
    err = ((got - expected).norm() / expected.norm()).item()
    print(f"lossless all-MLA vs SmolLM2 logits: rel err {err:.1e}; loss {student_loss:.4f} vs {teacher_loss:.4f}")
    assert err < 1e-5  # measured 1.1e-06
    assert report.student_kv_bytes_per_token == report.teacher_kv_bytes_per_token == 23040
    assert max(row["attn_out_rel_err"] for row in report.layers) < 1e-5


@pytest.fixture(scope="module")
def zebra_init(smollm2):
    teacher, spec, _ = smollm2
    return convert_teacher(teacher, spec, mla_layers=ZEBRA_LAYERS, mla=ZEBRA_MLA, mamba=dict(d_state=64, headdim=64))


def test_zebra_like_init_report_on_real_weights(zebra_init, text_ids):
    student, report = zebra_init
    print(report.table())
    assert [row["mixer"] for row in report.layers] == ["mla" if i in ZEBRA_LAYERS else "mamba" for i in range(30)]
    for row in report.layers:
        values = [v for k, v in row.items() if k.endswith("_err") or k == "kv_energy"]
        assert values and all(math.isfinite(v) for v in values), row
    mla = [row for row in report.layers if row["mixer"] == "mla"]
    # measured: energy kept 0.80 (layer 4) .. 0.99 (layer 0); k err 0.62 .. 0.81 (one RoPE key head shared by the
    # three KV heads), v err 0.24 .. 0.59, attention output err 1.1 .. 1.2
    assert all(0.7 < row["kv_energy"] <= 1.0 and row["kv_lora_rank"] == 128 for row in mla)
    assert all(0.0 < row["attn_out_rel_err"] < 2.0 for row in mla)  # lossy, yet not unrelated to the teacher's
    assert report.student_kv_bytes_per_token == 8 * (128 + 32) * 2 == 2560
    loss, _ = _loss(student, text_ids)
    print(f"initialized student loss {loss:.3f} (uniform {UNIFORM:.3f})")
    assert math.isfinite(loss)  # measured 14.96 (teacher 2.573): see the xfail below


@pytest.mark.xfail(
    strict=True,
    reason="measured 14.96 > ln(49152) = 10.80 on TEXT before ILD (torch seed 0): the 22 attention-initialized "
    "Mamba2 layers (linear attention, random gate rows) predict worse than uniform here (all-Mamba2 14.5; all-MLA at "
    "these dims 10.50, with rope_heads=per_kv_head 6.89; random mixers 10.80). On held-out embedded-corpus text the "
    "same init scores 10.5-11.8 and 4 ILD + 4 KD steps bring it to 5.6 (test_pipeline_real.py)",
)
def test_zebra_like_initialized_student_beats_the_uniform_loss(zebra_init, text_ids):
    loss, _ = _loss(zebra_init[0], text_ids)
    assert loss < UNIFORM
