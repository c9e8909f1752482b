"""ILD calls the student's layers one by one: they must see the packed documents exactly as the whole model does,
through the student's own `document_masking` (block masks where it says so, the dense mask as the reference)."""

import pytest
import torch

from models.teachers import TeacherTrace
from tests.models.tiny import tiny_model
from train.stages.ild import ILDModule


def test_ild_layers_get_the_students_block_masks(monkeypatch):
    import models.mixer_mla as mla

    torch.manual_seed(0)
    dense = tiny_model(mixers=("mla", "mamba", "mla"), document_masking="dense")
    flex = tiny_model(mixers=("mla", "mamba", "mla"), document_masking="flex")
    flex.load_state_dict(dense.state_dict())
    lengths = (40, 200, 70, 74)  # documents spanning 128-token blocks
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    batch = {"position_ids": positions, "attention_mask": torch.ones_like(positions)}
    hidden = [torch.randn(1, positions.shape[1], 64) for _ in range(3)]
    with torch.no_grad():  # targets: the dense student's own layers, so only a change of documents moves a loss
        docs, (cos, sin) = dense.model.documents(positions), dense.model.rope(positions)
        outs = [layer(h, cos, sin, docs, with_mixer=True) for layer, h in zip(dense.model.layers, hidden, strict=True)]
    trace = TeacherTrace(hidden, [m for _, m in outs], [o for o, _ in outs], final_hidden=hidden[0])
    with torch.no_grad():  # FlexAttention has no CPU backward; the GPU test compares gradients
        ild = ILDModule({"s": flex}, dense, {})
        merged = ild.losses_from_trace(trace, {**batch, "position_ids": torch.arange(384)[None]})
        monkeypatch.setattr(mla, "attention_mask", lambda *a, **k: pytest.fail("dense mask built under flex"))
        got = ild.losses_from_trace(trace, batch)
    print(f"ILD layer losses against the dense-mask layers, block masks: {got}; one merged document: {merged}")
    assert max(got.values()) < 1e-14
    assert min(merged.values()) > 1e-8  # sensitivity: every layer sees the documents (MLA masks, Mamba2 seq_idx)
