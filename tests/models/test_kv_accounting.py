"""Cache bytes: the analytic figures (Zebra-Llama 1B shapes) and the bytes the cache really allocates."""

import pytest
import torch

from models import HybridConfig, HybridForCausalLM, student_cache_bytes, teacher_cache_bytes
from models.sizes import LLAMA_3_2_1B, ZEBRA_1B_MAMBA, ZEBRA_1B_MLA

from .tiny import tiny_model


@pytest.mark.parametrize("mla_layers, percent", [([0, 5, 10, 14], 3.91), ([0, 2, 4, 6, 8, 10, 12, 14], 7.81)])
def test_zebra_1b_cache_fraction(mla_layers, percent):
    mixers = ["mla" if i in mla_layers else "mamba" for i in range(16)]
    config = HybridConfig(**LLAMA_3_2_1B, mixer_types=mixers, mla=ZEBRA_1B_MLA, mamba=ZEBRA_1B_MAMBA)
    student = student_cache_bytes(config, torch.bfloat16)
    teacher = teacher_cache_bytes(16, 8, 64, torch.bfloat16)
    assert teacher.per_token == 16 * 2 * 8 * 64 * 2
    assert student.per_token == len(mla_layers) * (128 + 32) * 2
    assert round(100 * student.per_token / teacher.per_token, 2) == percent
    # Mamba2 GQA state: conv over x (8 heads x 64), B (8 x 64), C (32 x 64), 3 taps; SSM 32x64x64 fp32.
    n_mamba = 16 - len(mla_layers)
    assert student.constant == n_mamba * ((512 + 512 + 2048) * 3 * 2 + 32 * 64 * 64 * 4)


@pytest.mark.parametrize("mixers", [("mla", "mamba", "mla"), ("mamba",), ("mla",)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accounting_equals_allocated_cache(mixers, dtype):
    model = tiny_model(mixers=mixers, dtype=dtype)
    batch, prompt, steps = 2, 11, 3
    ids = torch.randint(1, 97, (batch, prompt + steps))
    cache = model.make_cache(batch)
    with torch.no_grad():
        model(ids[:, :prompt], cache=cache)
        for t in range(prompt, prompt + steps):
            model(ids[:, t : t + 1], cache=cache)
    expected = student_cache_bytes(model.config, dtype).total(prompt + steps, batch)
    assert cache.nbytes() == expected
    assert expected > 0


def test_accounting_on_the_zebra_shape_allocates_what_it_says():
    """The real 1B-shaped cache (a short prompt through a meta-free, tiny-vocab copy of the shape)."""
    mixers = ["mla" if i in (0, 5, 10, 14) else "mamba" for i in range(16)]
    config = HybridConfig(
        **{**LLAMA_3_2_1B, "vocab_size": 64, "intermediate_size": 64},
        mixer_types=mixers,
        mla=ZEBRA_1B_MLA,
        mamba=ZEBRA_1B_MAMBA,
    )
    model = HybridForCausalLM(config).eval()
    cache = model.make_cache(1)
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 5)), cache=cache)
    assert cache.nbytes() == student_cache_bytes(config, torch.float32).total(5)
