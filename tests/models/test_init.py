"""Initialization from tiny random teachers saved to disk and loaded the way users load Hub models."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from models.init import build_student_config, convert_teacher, energy_rank
from models.sizes import TINY_LLAMA
from models.teachers import describe_teacher, load_teacher, load_teacher_config

from .tiny import rel_err

COMMON = {
    **TINY_LLAMA,
    "vocab_size": 101,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
TEACHERS = {
    "llama": lambda: LlamaConfig(**COMMON, rope_parameters=LLAMA3_ROPE),
    "llama_tied": lambda: LlamaConfig(**{**COMMON, "tie_word_embeddings": True}),
    "qwen2": lambda: Qwen2Config(**COMMON, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "qwen3": lambda: Qwen3Config(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
}


def saved_teacher(kind: str, tmp_path) -> str:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TEACHERS[kind]())
    with torch.no_grad():  # visible biases and norm weights, so dropping one would show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.5 if "norm" in name else 0.0, 0.3)
    path = tmp_path / kind
    model.save_pretrained(path)
    return str(path)


def _ids():
    return torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", list(TEACHERS))
def test_lossless_all_mla_student_reproduces_teacher(kind, tmp_path):
    teacher, spec = load_teacher(saved_teacher(kind, tmp_path))
    student, report = convert_teacher(teacher, spec, mla_layers="all", lossless=True)
    ids = _ids()
    with torch.no_grad():
        expected = teacher(ids).logits
        got = student(ids).logits
    err = rel_err(got, expected)
    print(f"{kind}: lossless student vs teacher logits rel err {err:.1e}")
    assert err < 1e-4
    assert report.student_kv_bytes_per_token == report.teacher_kv_bytes_per_token
    student.save_pretrained(tmp_path / "student")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student", trust_remote_code=True)
    with torch.no_grad():
        assert rel_err(reloaded(ids).logits, expected) < 1e-4
    if spec.tie_word_embeddings:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_mamba_init_is_causal_linear_attention_over_teacher_features(tmp_path):
    """Decay off (A = 0), dt = 1, D = 0, identity conv; gate and norm bypassed by the test only."""
    teacher, spec = load_teacher(saved_teacher("qwen2", tmp_path))  # biases exercise the bias mapping
    student, _ = convert_teacher(teacher, spec, mla_layers="none")
    mamba = student.model.layers[1].mamba
    with torch.no_grad():
        mamba.A_log.fill_(-float("inf"))  # A = -exp(-inf) = 0
        mamba.in_proj.weight[-mamba.dims.nheads :].zero_()  # dt rows
        mamba.in_proj.bias[-mamba.dims.nheads :].zero_()
        mamba.dt_bias.fill_(torch.log(torch.expm1(torch.tensor(1.0))).item())  # softplus(dt_bias) = 1
        mamba.D.zero_()
    mamba.norm.forward = lambda y, z=None: y  # bypass gate and norm
    mamba.out_proj = torch.nn.Identity()
    hidden = torch.randn(2, 23, 64)
    from models.documents import documents_from_positions

    y = mamba(hidden, documents_from_positions(torch.arange(23).expand(2, 23)))  # (B, T, H * hd)
    attn = teacher.model.layers[1].self_attn
    act = torch.nn.functional.silu
    q = act(attn.q_proj(hidden)).unflatten(-1, (4, 16))  # (B, T, H, hd)
    k = act(attn.k_proj(hidden)).unflatten(-1, (2, 16)).repeat_interleave(2, dim=2)
    v = act(attn.v_proj(hidden)).unflatten(-1, (2, 16)).repeat_interleave(2, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k).tril()  # causal, no softmax
    expected = torch.einsum("bhts,bshd->bthd", scores, v).flatten(-2)
    err = rel_err(y, expected)
    print(f"Mamba2 init vs causal linear attention: rel err {err:.1e}")
    assert err < 1e-5
    # Sensitivity: without the KV-head repetition (wrong grouping) the result differs.
    k_wrong = act(attn.k_proj(hidden)).unflatten(-1, (2, 16)).repeat(1, 1, 2, 1)
    wrong = torch.einsum("bhts,bshd->bthd", torch.einsum("bthd,bshd->bhts", q, k_wrong).tril(), v).flatten(-2)
    assert rel_err(wrong, expected) > 1e-2


def test_mla_error_falls_with_rank_and_vanishes_at_full_rank(tmp_path):
    teacher, spec = load_teacher(saved_teacher("llama", tmp_path))
    mla = dict(qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, rope_heads="per_kv_head")
    errors = []
    for rank in (8, 16, 32, 48, 64):  # full rank: min(hidden 64, 2 heads x (8 + 16)) = 48
        _, report = convert_teacher(teacher, spec, mla={**mla, "kv_lora_rank": min(rank, 48)})
        errors.append(max(row["v_rel_err"] + row["k_rel_err"] for row in report.layers))
    print("max K+V map error by rank:", [f"{e:.2e}" for e in errors])
    assert all(a > b for a, b in zip(errors[:3], errors[1:4], strict=True))
    assert errors[3] < 1e-10 and errors[4] < 1e-10


def test_energy_rule_returns_the_rank_it_promises(tmp_path):
    s = torch.tensor([10.0, 5.0, 3.0, 1.0, 0.5] + [0.1] * 20, dtype=torch.float64)
    captured = torch.cumsum(s**2, 0) / (s**2).sum()
    for energy in (0.5, 0.8, 0.9, 0.99, 0.999, 1.0):
        rank = energy_rank(s, energy)
        smallest = int((captured < energy - 1e-12).sum()) + 1
        assert rank % 8 == 0 or rank == len(s)
        assert rank >= smallest and rank - smallest < 8
        assert captured[rank - 1] >= energy - 1e-12
    teacher, spec = load_teacher(saved_teacher("llama", tmp_path))
    mla = dict(qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16)
    student, report = convert_teacher(teacher, spec, mla=mla, energy=0.9)
    for row in report.layers:
        assert row["kv_energy"] >= 0.9 and row["kv_lora_rank"] % 8 == 0
        assert student.model.layers[row["layer"]].self_attn.kv_lora_rank == row["kv_lora_rank"]


def test_unsupported_teacher_and_misfit_dims_fail_before_weights(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"not supported; supported: \['LlamaForCausalLM', 'MistralForCausalLM'"):
        describe_teacher(load_teacher_config(str(tmp_path / "gpt2")))
    with pytest.raises(ValueError, match="sliding-window"):
        describe_teacher(MistralConfig(**COMMON, sliding_window=32, architectures=["MistralForCausalLM"]))
    with pytest.raises(FileNotFoundError, match="without a config.json"):
        load_teacher_config(str(tmp_path))
    spec = describe_teacher(LlamaConfig(**COMMON, architectures=["LlamaForCausalLM"]))
    cases = [
        (
            dict(mla=dict(qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=16)),
            "must equal the teacher head_dim 16",
        ),
        (
            dict(mla=dict(qk_nope_head_dim=0, qk_rope_head_dim=32, v_head_dim=16)),
            r"qk_rope_head_dim=32 .* <= the teacher",
        ),
        (
            dict(mla=dict(qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, kv_lora_rank=49)),
            r"kv_lora_rank=49 exceeds .* allowed 1..48",
        ),
        (dict(mla_layers=[0, 3]), r"\[3\] outside the teacher's layers: allowed indices 0..2"),
        (dict(mla_layers="some"), "a list of layer indices, 'all' or 'none'"),
        (dict(mla_layers="none", mamba=dict(d_state=8)), "student.mamba.d_state=8 does not fit"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            build_student_config(spec, **kwargs)


def test_report_measures_attention_output_and_keeps_rope_pairs(tmp_path):
    """Full latent rank with per-KV-head RoPE keys: only the nope pairs lose their rotation. Keeping the
    teacher's pairs together makes the layer exact at position 0 and the report shows the positional cost."""
    teacher, spec = load_teacher(saved_teacher("llama", tmp_path))
    mla = dict(qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, kv_lora_rank=48, rope_heads="per_kv_head")
    student, report = convert_teacher(teacher, spec, mla=mla, rope_pairs="energy")
    print("\n" + report.table())
    for row in report.layers:
        assert row["k_rel_err"] < 1e-10 and row["v_rel_err"] < 1e-10
        assert 0 < row["attn_out_rel_err"] < 1.0
    # The public Zebra-Llama split (the first r dims become RoPE, rotated as r/2 fresh pairs) cuts the teacher's
    # pairs apart; emulated here by patching the split, it loses more of the attention output.
    import models.mixer_mla as mixer_mla

    original = mixer_mla.rope_split
    naive_split = lambda hd, idx: (torch.arange(2 * len(idx)), torch.arange(2 * len(idx), hd))  # noqa: E731
    mixer_mla.rope_split = naive_split
    try:
        _, naive = convert_teacher(teacher, spec, mla=mla, rope_pairs="uniform")
    finally:
        mixer_mla.rope_split = original
    ours = max(row["attn_out_rel_err"] for row in report.layers)
    theirs = min(row["attn_out_rel_err"] for row in naive.layers)
    print(f"attention output error: pairs kept {ours:.2e}, pairs split {theirs:.2e}")
    assert theirs > 1.5 * ours
    _, lossless = convert_teacher(teacher, spec, lossless=True)
    assert max(row["attn_out_rel_err"] for row in lossless.layers) < 1e-5
    report.to_json(tmp_path / "init.json")
    assert "attn_out_rel_err" in (tmp_path / "init.json").read_text()


def test_low_rank_queries_by_svd(tmp_path):
    teacher, spec = load_teacher(saved_teacher("qwen2", tmp_path))
    mla = dict(qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, kv_lora_rank=48)
    errors = [
        max(row["q_rel_err"] for row in convert_teacher(teacher, spec, mla={**mla, "q_lora_rank": r})[1].layers)
        for r in (16, 32, 64)
    ]
    print("q map error by q_lora_rank 16/32/64:", [f"{e:.1e}" for e in errors])
    assert errors[0] > errors[1] > 1e-3 and errors[2] < 1e-10


def test_random_mixer_init_keeps_the_trunk_and_differs_from_attention_init(tmp_path):
    """The ablation baseline: mixers from the model's initializer, everything else still the teacher's."""
    teacher, spec = load_teacher(saved_teacher("llama", tmp_path))
    mla = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
    converted, _ = convert_teacher(teacher, spec, mla_layers=[0], mla=mla)
    torch.manual_seed(3)
    random, report = convert_teacher(teacher, spec, mla_layers=[0], mla=mla, mixer_init="random")
    ours, theirs = converted.state_dict(), random.state_dict()
    mixers = [n for n in ours if ".self_attn." in n or ".mamba." in n]
    matrices = [n for n in mixers if n.endswith("proj.weight") or n.endswith("conv1d.weight")]
    assert len(matrices) >= 6 and all(not torch.equal(ours[n], theirs[n]) for n in matrices)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours if n not in mixers)  # embeddings, norms, MLPs
    assert [row["init"] for row in report.layers] == ["random"] * 3 and "-" in report.table()
    with pytest.raises(ValueError, match="student.mixer_init='svd'"):
        convert_teacher(teacher, spec, mixer_init="svd")
