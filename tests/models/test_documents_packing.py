"""Packed batches: each document must come out as if it ran alone (MLA layer, Mamba2 layer, whole model)."""

import pytest
import torch

from models.documents import documents_from_positions
from models.hybrid import HybridModel

from .tiny import rel_err, tiny_model

DOC_LENGTHS = [(5, 11, 3), (9, 10)]  # row 0: three documents, row 1: two; total 19 tokens per row
LENGTH = 19


def _packed_positions() -> torch.Tensor:
    rows = [torch.cat([torch.arange(n) for n in docs]) for docs in DOC_LENGTHS]
    return torch.stack(rows)


def _run_layer(layer, hidden, position_ids):
    model: HybridModel = _run_layer.model
    docs = documents_from_positions(position_ids)
    cos, sin = model.rope(position_ids)
    return layer.mix(hidden, cos, sin, docs)


@pytest.mark.parametrize("mixer", ["mla", "mamba"])
def test_single_layer_packed_equals_documents_alone(mixer):
    model = tiny_model(mixers=(mixer,)).model
    _run_layer.model = model
    layer = model.layers[0]
    hidden = torch.randn(2, LENGTH, 64)
    positions = _packed_positions()
    packed = _run_layer(layer, hidden, positions)
    worst = 0.0
    for row, docs in enumerate(DOC_LENGTHS):
        start = 0
        for n in docs:
            alone = _run_layer(layer, hidden[row : row + 1, start : start + n], torch.arange(n)[None])
            worst = max(worst, rel_err(packed[row, start : start + n], alone[0]))
            start += n
    print(f"{mixer}: max rel err packed vs alone {worst:.2e}")
    assert worst < 1e-5
    # Sensitivity: without the boundaries (one long document) the later documents change.
    merged = _run_layer(layer, hidden, torch.arange(LENGTH).expand(2, LENGTH))
    assert rel_err(merged[0, 5:], packed[0, 5:]) > 1e-2


@pytest.mark.parametrize("masking", ["dense", "flex"])
def test_whole_model_packed_equals_documents_alone(masking):
    model = tiny_model(mixers=("mla", "mamba", "mamba", "mla"), document_masking=masking)
    ids = torch.randint(0, 97, (2, LENGTH))
    with torch.no_grad():  # FlexAttention has no CPU backward: forward only here, gradients on the GPU
        packed = model(ids, position_ids=_packed_positions()).logits
        worst = 0.0
        for row, docs in enumerate(DOC_LENGTHS):
            start = 0
            for n in docs:
                alone = model(ids[row : row + 1, start : start + n]).logits
                worst = max(worst, rel_err(packed[row, start : start + n], alone[0]))
                start += n
    print(f"hybrid model, {masking} masks: max rel err packed vs alone {worst:.2e}")
    assert worst < 1e-5


def test_packed_gradients_do_not_cross_documents():
    model = tiny_model(mixers=("mamba", "mla"))
    embeds = torch.randn(1, 16, 64, requires_grad=True)
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    hidden = model.model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
    hidden[0, 7:].sum().backward()  # loss on the second document only
    leak, signal = embeds.grad[0, :7].abs().max(), embeds.grad[0, 7:].abs().max()
    print(f"gradient into document 1 from a loss on document 2: {leak:.1e} (own: {signal:.1e})")
    assert signal > 1e-3 and leak < 1e-9 * signal  # fp rounding only


def test_block_masks_equal_dense_masks_across_blocks(monkeypatch):
    """FlexAttention's BlockMask (the CUDA default) against the dense mask (the CPU reference) on rows of several
    128-token blocks, with documents spanning blocks, blocks wholly inside one document and ones skipped. The flex
    run must not build a dense mask at all. (Forward only: FlexAttention has no CPU backward; the GPU test compares
    gradients at 8K.)"""
    import models.mixer_mla as mla

    lengths = [(40, 200, 70, 74), (384,), (128, 128, 1, 127)]
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    ids = torch.randint(0, 97, positions.shape)
    dense = tiny_model(mixers=("mla", "mamba", "mla"), document_masking="dense")
    flex = tiny_model(mixers=("mla", "mamba", "mla"), document_masking="flex")
    flex.load_state_dict(dense.state_dict())
    with torch.no_grad():
        expected = dense(ids, position_ids=positions).logits
        merged = flex(ids, position_ids=torch.arange(384).expand(3, 384)).logits  # one document per row
        monkeypatch.setattr(mla, "attention_mask", lambda *a, **k: pytest.fail("dense mask built under flex"))
        got = flex(ids, position_ids=positions).logits
    err = rel_err(got, expected)
    print(f"flex vs dense masks: logits rel err {err:.1e}")
    assert err < 1e-5
    assert rel_err(merged[0, 40:], got[0, 40:]) > 1e-2  # sensitivity: the block mask does isolate documents


def test_document_block_masks_equal_flex_attentions_own_builder():
    """`document_block_mask` derives the blocks from document ranges; FlexAttention's `create_block_mask` (eager:
    the mask at every pair) is the reference: same partial and full blocks, same indices, both directions, on rows
    whose length is not a multiple of the block, with documents inside, across and exactly on block edges."""
    from torch.nn.attention.flex_attention import create_block_mask

    from models.documents import BLOCK_SIZE, document_block_mask, document_index

    gen = torch.Generator().manual_seed(0)
    rows = [(40, 200, 70, 90), (400,), (128, 128, 1, 143), (300, 100), (5, 128, 256, 11)]
    rows += [tuple(torch.randint(1, 160, (8,), generator=gen).tolist()) for _ in range(3)]
    for lengths in rows:
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        doc, length = document_index(positions), positions.shape[1]
        reference = create_block_mask(
            lambda b, h, q, k, doc=doc: (k <= q) & (doc[b, q] == doc[b, k]),
            1,
            None,
            length,
            length,
            device="cpu",
            BLOCK_SIZE=BLOCK_SIZE,
            _compile=False,
        )
        got = document_block_mask(positions)
        for counts, indices in [
            ("kv_num_blocks", "kv_indices"),
            ("full_kv_num_blocks", "full_kv_indices"),
            ("q_num_blocks", "q_indices"),
            ("full_q_num_blocks", "full_q_indices"),
        ]:
            n = getattr(reference, counts)
            assert torch.equal(getattr(got, counts), n), (lengths, counts)
            for q, m in enumerate(n.flatten().tolist()):  # the kept blocks; the order past them is free
                want, have = getattr(reference, indices)[0, 0, q, :m], getattr(got, indices)[0, 0, q, :m]
                assert sorted(have.tolist()) == sorted(want.tolist()), (lengths, indices, q)
        assert torch.equal(got.to_dense(), reference.to_dense()), lengths


def test_flex_masks_refuse_training_on_cpu():
    model = tiny_model(mixers=("mla",), document_masking="flex").train()
    positions = torch.cat([torch.arange(5), torch.arange(6)])[None]
    with pytest.raises(ValueError, match="document_masking='flex'.*CUDA"):
        model(torch.randint(0, 97, (1, 11)), position_ids=positions).logits.sum().backward()
