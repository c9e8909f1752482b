"""The preallocated HybridCache (max_length): same logits as the growing cache and the full forward, and a
decode step that reads no host-side counter (what a replayed CUDA graph needs)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models import student_cache_bytes

from .test_decoding import _left_padded_batch
from .tiny import rel_err, tiny_model

MAPS = [("mla", "mamba", "mla", "mamba"), ("mla",), ("mamba", "mla")]


def _decode(model, ids, mask, continuation, cache, frozen_host_counter=False):
    """Prefill, then one token per call; logits predicting positions prompt_len-1 ... end-1.

    With `frozen_host_counter`, the host-side `seen_tokens` is put back to its value after the first step
    before every later step, as in a CUDA graph replayed from that capture: only device state may move on.
    """
    prompt_len, steps = ids.shape[1], continuation.shape[1]
    full_mask = torch.cat([mask, torch.ones_like(continuation)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    logits = [model(ids, attention_mask=mask, cache=cache).logits[:, -1]]
    frozen = None
    for t in range(steps - 1):
        if frozen_host_counter and frozen is not None:
            cache.seen_tokens = frozen
        pos = positions[:, prompt_len + t : prompt_len + t + 1]
        logits.append(model(continuation[:, t : t + 1], position_ids=pos, cache=cache).logits[:, -1])
        frozen = frozen if frozen is not None else cache.seen_tokens
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("mixers", MAPS)
def test_static_cache_matches_growing_cache_and_full_forward(mixers):
    model = tiny_model(mixers=mixers)
    prompt_lengths, prompt_len, steps = (11, 5), 11, 6
    ids, mask = _left_padded_batch(prompt_lengths, prompt_len)
    continuation = torch.randint(1, 97, (2, steps))
    with torch.no_grad():
        full_mask = torch.cat([mask, torch.ones(2, steps, dtype=torch.long)], dim=1)
        full = model(torch.cat([ids, continuation], 1), attention_mask=full_mask).logits[:, prompt_len - 1 : -1]
        growing = _decode(model, ids, mask, continuation, model.make_cache(2))
        # Room to spare: slots past the written ones must be masked, not just absent.
        static_cache = model.make_cache(2, max_length=prompt_len + steps + 5)
        static = _decode(model, ids, mask, continuation, static_cache)
        replayed = _decode(model, ids, mask, continuation, model.make_cache(2, max_length=32), frozen_host_counter=True)
    assert rel_err(growing, full) < 1e-4
    assert rel_err(static, full) < 1e-4
    assert rel_err(static, growing) < 1e-5
    assert rel_err(replayed, full) < 1e-4
    assert static_cache.seen_tokens == static_cache.position.item() == prompt_len + steps - 1
    if "mla" in mixers:
        layer = next(c for c in static_cache.layers if hasattr(c, "latent"))
        assert layer.latent.shape[1] == prompt_len + steps + 5  # written in place, never grown
        assert layer.latent[:, prompt_len + steps - 1 :].abs().max() == 0


def test_static_cache_writes_in_place_and_allocates_what_accounting_says():
    model = tiny_model()
    cache = model.make_cache(2, max_length=20)
    pointers = [t.data_ptr() for layer in cache.layers for t in layer.tensors()]
    with torch.no_grad():
        model(torch.randint(1, 97, (2, 7)), cache=cache)
        model(torch.randint(1, 97, (2, 1)), cache=cache)
    assert [t.data_ptr() for layer in cache.layers for t in layer.tensors()] == pointers
    assert cache.nbytes() == student_cache_bytes(model.config, torch.float32).total(20, 2)


def test_static_cache_refuses_tokens_past_its_end():
    model = tiny_model()
    cache = model.make_cache(1, max_length=8)
    with torch.no_grad():
        model(torch.randint(1, 97, (1, 8)), cache=cache)
        with pytest.raises(ValueError, match="max_length=8"):
            model(torch.randint(1, 97, (1, 1)), cache=cache)


def test_generate_with_a_static_cache_equals_default_generate():
    model = tiny_model()
    ids, mask = _left_padded_batch((8, 5), 8)
    with torch.no_grad():
        default = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        cache = model.make_cache(2, max_length=8 + 6)
        static = model.generate(
            ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, cache=cache
        )
    assert torch.equal(default, static)
    assert cache.seen_tokens == 8 + 5  # the last generated token is never fed back


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


# A CUDA graph cannot capture a host sync (.item(), bool(tensor), nonzero) nor a tensor made from host data
# (torch.tensor(list), indexing with a list): on CUDA these fail at capture or bake a stale value into replays.
HOST_OPS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.nonzero", "aten.lift_fresh"}


def test_static_decode_step_has_no_host_sync_or_host_data():
    model = tiny_model(mla=dict(q_lora_rank=24))
    cache = model.make_cache(2, max_length=32)
    token = torch.randint(1, 97, (2, 1))
    with torch.no_grad():
        model(torch.randint(1, 97, (2, 10)), cache=cache)
        model(token, position_ids=torch.full((2, 1), 10), cache=cache)  # first decode step (warmup)
        with _RecordOps() as recorder:
            model(token, position_ids=torch.full((2, 1), 11), cache=cache)
    assert "aten.index_copy_" in recorder.ops  # the in-place cache write was recorded
    assert not HOST_OPS & set(recorder.ops), HOST_OPS & set(recorder.ops)
