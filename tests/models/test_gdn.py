"""The Gated DeltaNet mixer kind: packed documents, cached calls (whole decodes: test_decoding.py), init from
attention, config, export.

(The registry contract, a GDN-only model's forward and its cache bytes are checked for every kind in
tests/models/test_mixers.py; the kernels in tests/models/test_gated_delta.py.)"""

import pytest
import torch
import torch.nn.functional as F

from models.documents import documents_from_positions
from models.init import build_student_config, convert_teacher
from models.teachers import describe_teacher, load_teacher

from .test_init import COMMON, saved_teacher
from .tiny import rel_err, run_exported, tiny_model

DOC_LENGTHS = [(5, 11, 3), (9, 10)]
LENGTH = 19


def _packed_positions() -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in docs]) for docs in DOC_LENGTHS])


def _mix(model, layer, hidden, positions, cache=None):
    cos, sin = model.model.rope(positions)
    docs = documents_from_positions(positions)
    return layer.kind.call(layer.mixer, layer.input_layernorm(hidden), cos, sin, docs, cache)


def test_packed_layer_equals_documents_alone():
    model = tiny_model(mixers=("gdn",))
    layer = model.model.layers[0]
    hidden = torch.randn(2, LENGTH, 64)
    with torch.no_grad():
        packed = _mix(model, layer, hidden, _packed_positions())
        worst = 0.0
        for row, docs in enumerate(DOC_LENGTHS):
            start = 0
            for n in docs:
                alone = _mix(model, layer, hidden[row : row + 1, start : start + n], torch.arange(n)[None])
                worst = max(worst, rel_err(packed[row, start : start + n], alone[0]))
                start += n
        merged = _mix(model, layer, hidden, torch.arange(LENGTH).expand(2, LENGTH))
    print(f"gdn: max rel err packed vs alone {worst:.2e}")
    assert worst < 1e-5
    assert rel_err(merged[0, 5:], packed[0, 5:]) > 1e-2  # sensitivity: the boundaries do reset conv and state


def test_chunked_continuation_and_new_document_in_a_cached_call():
    """A cached multi-token call continues the state (chunked form from the cached conv and recurrent state) and
    drops it where a row starts a new document, at the call's first token or inside the call."""
    model = tiny_model(mixers=("gdn",))
    layer = model.model.layers[0]
    hidden = torch.randn(2, 16, 64)
    positions = torch.arange(16).expand(2, 16).clone()
    positions[1, 9:] = torch.arange(7)  # row 1: a new document starts with the cached call (the cache is dropped)
    positions[0, 12:] = torch.arange(4)  # row 0: one starts inside the call (the chunked form resets there)
    with torch.no_grad():
        full = _mix(model, layer, hidden, positions)
        cache = model.make_cache(2)
        _mix(model, layer, hidden[:, :9], positions[:, :9], cache[0])
        cos, sin = model.model.rope(positions[:, 9:])
        docs = documents_from_positions(positions[:, 9:], past_len=9, cached_doc_start=torch.zeros(2, dtype=torch.long))
        tail = layer.kind.call(layer.mixer, layer.input_layernorm(hidden[:, 9:]), cos, sin, docs, cache[0])
    err = rel_err(tail, full[:, 9:])
    print(f"cached chunked continuation vs full: rel err {err:.2e}")
    assert err < 1e-5


# ----------------------------------------------------------------------------------------- init from attention


def _linear_attention_reference(attn, hidden, beta0: float, half_life: float, eps: float, tile_kv=False):
    """From the teacher's attention weights alone: o_proj(RMSNorm_head(beta0 * sum_{s<=t} alpha0^(t-s) (q̂_t . k̂_s)
    v_s)) with SiLU features, q̂ and k̂ L2-normalized, k and v repeated over the query groups (`tile_kv`: the wrong
    grouping, KV heads tiled instead)."""
    act = F.silu
    repeat = (lambda x: x.repeat(1, 1, 2, 1)) if tile_kv else (lambda x: x.repeat_interleave(2, dim=2))
    q = F.normalize(act(attn.q_proj(hidden)).unflatten(-1, (4, 16)), dim=-1)  # (B, T, H, hd)
    k = repeat(F.normalize(act(attn.k_proj(hidden)).unflatten(-1, (2, 16)), dim=-1))
    v = repeat(act(attn.v_proj(hidden)).unflatten(-1, (2, 16)))
    t = torch.arange(hidden.shape[1], dtype=torch.float64)
    decay = (0.5 ** ((t[:, None] - t[None, :]) / half_life)).tril()  # alpha0^(t-s), causal
    scores = torch.einsum("bthd,bshd->bhts", q.double(), k.double()) * decay
    y = beta0 * torch.einsum("bhts,bshd->bthd", scores, v.double())
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return attn.o_proj(y.flatten(-2).float())


def test_init_is_normalized_linear_attention_over_teacher_features(tmp_path):
    """The statement of models/mixer_gdn.py: to first order in beta_init, the initialized layer is decayed causal
    linear attention over the teacher's SiLU q/k/v features, normalized per head. With the norm's eps out of the way
    (1e-12) the error falls in proportion to beta_init (the delta rule's erase term); at the default eps it stays
    small; a wrong KV grouping does not pass."""
    teacher, spec = load_teacher(saved_teacher("qwen2", tmp_path))  # q/k/v/o biases exercise the bias mapping
    hidden = torch.randn(2, 23, 64, generator=torch.Generator().manual_seed(0))
    attn = teacher.model.layers[1].self_attn
    docs = documents_from_positions(torch.arange(23).expand(2, 23))
    errors = {}
    for beta0, eps in ((0.02, 1e-12), (0.002, 1e-12), (0.002, None)):
        settings = dict(beta_init=beta0, init_half_life=16.0)  # a short half-life: the decay is visible in 23 tokens
        settings.update({} if eps is None else dict(norm_eps=eps))
        student, report = convert_teacher(teacher, spec, mixer_types=["gdn"] * 3, gdn=settings)
        gdn = student.model.layers[1].gdn
        with torch.no_grad():
            got = gdn(hidden, docs)
            expected = _linear_attention_reference(attn, hidden, beta0, 16.0, gdn.o_norm.eps)
        errors[beta0, gdn.o_norm.eps] = rel_err(got, expected)
    assert [row["mixer"] for row in report.layers] == ["gdn"] * 3
    assert student.config.mixer_settings("gdn").qkv_bias and gdn.q_proj.bias is not None
    with torch.no_grad():  # the gates as stated, read back from the module
        alpha = torch.exp(-torch.exp(gdn.A_log) * F.softplus(gdn.dt_bias))
        assert torch.allclose(alpha, torch.full_like(alpha, 0.5 ** (1 / 16.0)), rtol=1e-6)
        assert torch.allclose(torch.sigmoid(gdn.b_proj.bias), torch.full((4,), 0.002), rtol=1e-5)
        assert torch.allclose(F.silu(gdn.g_proj.bias) * gdn.o_norm.weight, torch.ones(64), rtol=1e-6)
        wrong = _linear_attention_reference(attn, hidden, 0.002, 16.0, gdn.o_norm.eps, tile_kv=True)
    ratio = errors[0.02, 1e-12] / errors[0.002, 1e-12]
    print(f"GDN init vs normalized linear attention, rel err by (beta_init, eps): {errors}; ratio {ratio:.2f}")
    assert errors[0.002, 1e-12] < 5e-3 and 9 < ratio < 11  # first order in beta_init
    assert errors[0.002, gdn.o_norm.eps] < 1e-2
    assert rel_err(got, wrong) > 1e-1  # sensitivity: KV heads tiled instead of repeated per query group


def test_settings_fit_the_teacher_and_name_their_keys():
    from transformers import LlamaConfig

    spec = describe_teacher(LlamaConfig(**COMMON, architectures=["LlamaForCausalLM"]))
    mla = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16)
    config = build_student_config(spec, mixer_types=["mla", "gdn", "mamba"], mla=mla)
    assert config.mixer_settings("gdn").head_k_dim == spec.head_dim == config.mixer_settings("gdn").head_v_dim
    cases = [
        (dict(head_k_dim=8), "student.gdn.head_k_dim=8 does not fit"),
        (dict(num_kv_heads=4), "student.gdn.num_kv_heads=4 does not fit"),
        (dict(num_kv_heads=3), r"gdn.num_kv_heads=3 is invalid: must divide num_heads=4"),
        (dict(beta_init=1.0), r"gdn.beta_init=1.0 is invalid"),
    ]
    for gdn, message in cases:
        with pytest.raises(ValueError, match=message):
            build_student_config(spec, mixer_types=["gdn"] * 3, gdn=gdn)


def test_student_gdn_config_group_reaches_the_student():
    """`student.gdn.*` (train/config/schema.py GDNSettings) composes, validates and builds the student's GDN."""
    from dataclasses import fields

    from models.mixer_gdn import GDNConfig
    from train.config import compose_config, student_init_kwargs, teacher_spec, validate_config
    from train.config.schema import GDNSettings

    assert {f.name for f in fields(GDNSettings)} == {f.name for f in fields(GDNConfig)}  # one definition
    overrides = ["student.mla_layers=all", "student.layers={1:gdn,3:mla}", "student.gdn.beta_init=0.1"]
    cfg = validate_config(compose_config(overrides))
    kwargs = student_init_kwargs(cfg.student)
    for init_only in ("rope_pairs", "conv_init", "mixer_init"):
        kwargs.pop(init_only)
    config = build_student_config(teacher_spec(cfg.teacher), **kwargs)
    assert config.mixer_types == ["mamba", "gdn", "mamba", "mla"]
    assert config.mixer_settings("gdn").beta_init == 0.1


# --------------------------------------------------------------------------------------------------- export


def test_mixed_student_exports_reloads_and_generates_with_its_cache(tmp_path):
    """An MLA + Mamba2 + GDN student: save_pretrained, AutoModelForCausalLM(trust_remote_code) in a fresh interpreter
    without this repository, same logits, and generate() with the compressed cache equal to a greedy decode that
    runs the full forward (no cache) every step."""
    model = tiny_model(mixers=("gdn", "mamba", "mla", "gdn"))
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    torch.save({"ids": ids, "logits": expected}, tmp_path / "check.pt")
    assert {"mixer_gdn.py", "gated_delta.py"} <= {p.name for p in tmp_path.iterdir()}
    run_exported(
        tmp_path,
        """
        assert model.config.mixer_types == ["gdn", "mamba", "mla", "gdn"]
        with torch.no_grad():
            logits = model(check["ids"]).logits
            assert torch.allclose(logits, check["logits"], atol=1e-5), (logits - check["logits"]).abs().max()
            out = model.generate(check["ids"], max_new_tokens=6, do_sample=False, pad_token_id=0)
            seq = check["ids"]
            for _ in range(6):
                seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(out, seq), (out, seq)
        """,
    )
