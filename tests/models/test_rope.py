"""The student's RoPE table against transformers' own implementation of each variant the teachers use."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from models.rope import apply_rope, rope_inv_freq
from models.sizes import LLAMA3_ROPE

VARIANTS = {
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": LLAMA3_ROPE,
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 1000000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    },
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_inv_freq_matches_transformers(name):
    params = VARIANTS[name]
    config = LlamaConfig(
        hidden_size=2048,
        num_attention_heads=32,
        head_dim=64,
        max_position_embeddings=131072,
        rope_parameters=dict(params),
    )
    ref_freq, ref_scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
    freq, scale = rope_inv_freq(params, 64, 131072)
    assert torch.allclose(freq, ref_freq.float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(ref_scale)
    if name == "llama3":  # the scaling actually changes the low frequencies
        plain, _ = rope_inv_freq({"rope_type": "default", "rope_theta": 500000.0}, 64, 131072)
        assert not torch.allclose(freq, plain)


def test_default_rope_and_rotation_match_llama_attention():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    positions = torch.arange(12)[None]
    x = torch.randn(1, 4, 12, 16)  # (B, heads, T, d), HF layout
    cos_hf, sin_hf = LlamaRotaryEmbedding(config)(x, positions)
    ref, _ = apply_rotary_pos_emb(x, x, cos_hf, sin_hf)
    freq, scale = rope_inv_freq(config.rope_parameters, 16, 2048)
    angles = positions[..., None].float() * freq
    ours = apply_rope(x.transpose(1, 2), angles.cos() * scale, angles.sin() * scale).transpose(1, 2)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_unknown_rope_type_is_refused():
    with pytest.raises(ValueError, match="rope_type='dynamic' is not supported"):
        rope_inv_freq({"rope_type": "dynamic", "factor": 2.0}, 64, 2048)


def test_a_scaled_teacher_and_its_student_see_the_same_positions(tmp_path):
    """teacher.rope_scaling: the teacher's HF rotary embedding and the student built from its spec give the same
    cos/sin past the pretraining length (yarn x4 of 64 positions), and both differ from the unscaled RoPE there."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from models import HybridForCausalLM
    from models.init.student_config import build_student_config
    from models.teachers import load_teacher

    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    positions = torch.arange(256)[None]
    x = torch.zeros(1, 256, 64)
    results = {}
    for name, scaling in (("plain", None), ("yarn", {"rope_type": "yarn", "factor": 4.0})):
        teacher, spec = load_teacher(str(tmp_path), rope_scaling=scaling)
        mla = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16)
        student = HybridForCausalLM(build_student_config(spec, mla_layers=[0], mla=mla))
        cos_t, sin_t = teacher.model.rotary_emb(x, positions)  # (1, T, head_dim): halves repeated
        cos_s, sin_s = student.model.rope(positions)  # (1, T, head_dim / 2) (+ the attention scaling)
        half = cos_t.shape[-1] // 2
        err = max((cos_t[..., :half] - cos_s).abs().max().item(), (sin_t[..., :half] - sin_s).abs().max().item())
        print(f"{name}: max positions {spec.max_position_embeddings}, teacher vs student cos/sin max diff {err:.1e}")
        assert err < 1e-5
        results[name] = cos_s
    assert spec.max_position_embeddings == 256
    assert (results["yarn"][0, 100:] - results["plain"][0, 100:]).abs().max() > 1e-2
