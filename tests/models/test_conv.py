"""Causal depthwise conv: against torch's conv1d per document, with carried state and decoding steps."""

import torch
import torch.nn.functional as F

from models.conv import causal_conv1d, causal_conv1d_step


def _reference(x, weight, bias):
    k = weight.shape[-1]
    return F.conv1d(F.pad(x, (k - 1, 0)), weight[:, None], bias, groups=x.shape[1])


def test_documents_equal_separate_runs_and_state_continues():
    x, w, b = torch.randn(2, 6, 17), torch.randn(6, 4), torch.randn(6)
    lengths = [(5, 2, 10), (17,)]
    seq_idx = torch.stack(
        [torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in [lengths[0], lengths[1]]]
    )
    out, state = causal_conv1d(x, w, b, seq_idx=seq_idx)
    start = 0
    for n in lengths[0]:
        assert torch.allclose(out[0:1, :, start : start + n], _reference(x[0:1, :, start : start + n], w, b), atol=1e-6)
        start += n
    assert torch.allclose(out[1:], _reference(x[1:], w, b), atol=1e-6)
    # The carried state is the last document's inputs; stepping on from it equals the longer sequence.
    nxt = torch.randn(2, 6)
    stepped = causal_conv1d_step(nxt, state.clone(), w, b)
    longer = _reference(torch.cat([x[1:], nxt[1:, :, None]], -1), w, b)[..., -1]
    assert torch.allclose(stepped[1:], longer, atol=1e-6)
    last_doc = torch.cat([x[0:1, :, 7:], nxt[0:1, :, None]], -1)
    assert torch.allclose(stepped[0:1], _reference(last_doc, w, b)[..., -1], atol=1e-6)
