"""Cached decoding (prefill, then one token at a time) against the full forward, with left padding."""

import pytest
import torch

from models.documents import documents_from_positions

from .tiny import rel_err, tiny_model

MAPS = [
    ("mla", "mamba", "mla", "mamba"),
    ("mamba", "mamba", "mla"),
    ("mla",),
    ("mamba",),
    ("gdn", "mamba", "mla"),
    ("gdn",),
]


def _left_padded_batch(lengths, total, vocab=97, pad=0):
    ids = torch.full((len(lengths), total), pad)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, total - n :] = torch.randint(1, vocab, (n,))
        mask[row, total - n :] = 1
    return ids, mask


@pytest.mark.parametrize("mixers", MAPS)
def test_incremental_decoding_matches_full_forward(mixers):
    model = tiny_model(mixers=mixers)
    prompt_lengths, prompt_len, steps = (13, 6, 9), 13, 7
    ids, mask = _left_padded_batch(prompt_lengths, prompt_len)
    continuation = torch.randint(1, 97, (3, steps))
    full_ids = torch.cat([ids, continuation], dim=1)
    full_mask = torch.cat([mask, torch.ones(3, steps, dtype=torch.long)], dim=1)
    with torch.no_grad():
        full = model(full_ids, attention_mask=full_mask).logits
        cache = model.make_cache(3)
        step_logits = [model(ids, attention_mask=mask, cache=cache).logits[:, -1]]
        for t in range(steps - 1):
            m = full_mask[:, : prompt_len + t + 1]
            step_logits.append(model(continuation[:, t : t + 1], attention_mask=m, cache=cache).logits[:, -1])
    incremental = torch.stack(step_logits, dim=1)  # predictions for positions prompt_len-1 ... end-1
    reference = full[:, prompt_len - 1 : -1]
    err = rel_err(incremental, reference)
    print(f"{mixers}: incremental vs full rel err {err:.2e}")
    assert err < 1e-4
    # Left padding is invisible: each row equals the same sequence run alone, unpadded.
    for row, n in enumerate(prompt_lengths):
        alone = model(full_ids[row : row + 1, prompt_len - n :]).logits[0, n - 1 : -1]
        assert rel_err(reference[row], alone) < 1e-4


def test_absorbed_decoding_equals_expanded_form():
    model = tiny_model(mixers=("mla",), mla=dict(qkv_bias=True), num_attention_heads=4, num_key_value_heads=2)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        for p in attn.parameters():  # random biases too, so the absorbed bias terms are exercised
            p.normal_(0, 0.3)
    hidden = torch.randn(2, 10, 64)
    positions = torch.arange(10).expand(2, 10)
    cos, sin = model.model.rope(positions)
    cache = model.make_cache(2)
    with torch.no_grad():
        attn(hidden[:, :9], cos[:, :9], sin[:, :9], documents_from_positions(positions[:, :9]), cache[0])
        docs = documents_from_positions(positions[:, 9:], past_len=9, cached_doc_start=torch.zeros(2, dtype=torch.long))
        absorbed = attn(hidden[:, 9:], cos[:, 9:], sin[:, 9:], docs, _copy(cache[0]), absorb=True)
        expanded = attn(hidden[:, 9:], cos[:, 9:], sin[:, 9:], docs, _copy(cache[0]), absorb=False)
    err = rel_err(absorbed, expanded)
    print(f"absorbed vs expanded MLA decode rel err {err:.2e}")
    assert err < 1e-5 and absorbed.abs().max() > 0


@pytest.mark.parametrize(
    "mla",
    [
        dict(kv_up_layout="per_head", rope_heads="per_kv_head"),
        dict(q_lora_rank=24, q_latent_norm=True, latent_norm=True, qk_norm=True),
        dict(qk_nope_head_dim=0, qk_rope_head_dim=16, v_head_dim=16, rope_heads="per_kv_head", kv_lora_rank=32),
    ],
)
def test_mla_variants_decode_consistently(mla):
    model = tiny_model(mixers=("mla", "mamba"), mla=mla)
    ids = torch.randint(1, 97, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.make_cache(2)
        model(ids[:, :8], cache=cache)
        steps = [model(ids[:, t : t + 1], cache=cache).logits[:, -1] for t in range(8, 12)]
    assert rel_err(torch.stack(steps, 1), full[:, 8:]) < 1e-4


def _copy(layer_cache):
    from models.mixer_mla import MLALayerCache

    return MLALayerCache(layer_cache.latent.clone(), layer_cache.rope_key.clone())


def test_generate_greedy_matches_manual_loop_and_sampling_runs():
    model = tiny_model()
    ids, mask = _left_padded_batch((8, 5), 8)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        # Greedy without a cache: the full forward each step.
        seq, m = ids, mask
        for _ in range(6):
            nxt = model(seq, attention_mask=m).logits[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
        torch.manual_seed(0)
        sampled = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)
    assert torch.equal(out, seq)
    assert sampled.shape == (2, 14)
