"""student.compile: the torch.compile'd RMSNorm, MLP activation and Mamba2 conv (models/compile.py) give the
eager model's loss and gradients on a packed batch; they are really compiled in training and never in eval.
Runs inductor's CPU backend (a C++ compiler), as the GPU runs its Triton backend."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from models.compile import compile_enabled, set_compile
from tests.models.tiny import rel_err, tiny_model


@pytest.fixture
def compiled_on_cpu():
    torch._dynamo.reset()
    counters.clear()
    set_compile(True, devices=("cpu",))
    yield
    set_compile(False)
    torch._dynamo.reset()


def _packed_batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=g)
    # Row 0: documents of 13, 20 and 7 tokens; row 1: one document. The conv and the scan must reset.
    positions = torch.cat([torch.arange(13), torch.arange(20), torch.arange(7)]).expand(2, 40).clone()
    positions[1] = torch.arange(40)
    return ids, positions


def _loss_and_grads(model, ids, positions):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, position_ids=positions).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_training_step_matches_eager(compiled_on_cpu):
    model = tiny_model().train()
    ids, positions = _packed_batch(model)
    set_compile(False)
    eager_loss, eager_grads = _loss_and_grads(model, ids, positions)
    set_compile(True, devices=("cpu",))
    loss, grads = _loss_and_grads(model, ids, positions)

    # One graph each for the norm, the MLP activation and the conv (with seq_idx): the layers share them.
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
    assert rel_err(loss, eager_loss) < 1e-5
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        assert rel_err(grad, eager_grads[name]) < 1e-4, name


def test_eval_and_generation_stay_eager(compiled_on_cpu):
    assert compile_enabled()
    model = tiny_model()
    ids, positions = _packed_batch(model)
    with torch.no_grad():
        model(input_ids=ids, position_ids=positions)
        model.generate(ids[:1, :5], max_new_tokens=3, do_sample=False)
    assert counters["stats"]["unique_graphs"] == 0


def test_a_batch_of_another_length_still_matches_eager(compiled_on_cpu):
    # A last partial batch or DPO's padded pairs: recompiled (with symbolic sizes), same values.
    model = tiny_model().train()
    ids, positions = _packed_batch(model)
    _loss_and_grads(model, ids, positions)  # compiled for length 40
    short_ids, short_positions = ids[:1, :24], positions[:1, :24]
    loss, grads = _loss_and_grads(model, short_ids, short_positions)
    set_compile(False)
    eager_loss, eager_grads = _loss_and_grads(model, short_ids, short_positions)
    assert rel_err(loss, eager_loss) < 1e-5
    for name, grad in grads.items():
        assert rel_err(grad, eager_grads[name]) < 1e-4, name


def test_past_the_recompile_limit_new_variants_run_eagerly(compiled_on_cpu, caplog):
    # ILD (frozen norms, detached inputs), KD, DPO's lengths and dtypes each add variants; fullgraph would raise
    # at Dynamo's recompile_limit. Here the limit is 1: the second length must still give eager's values.
    # (config.patch, not monkeypatch.setattr: Dynamo's config module must see its own restore, or later
    # torch.compile users, FlexAttention among them, find the key gone.)
    with torch._dynamo.config.patch(recompile_limit=1):
        _past_the_limit(caplog)


def _past_the_limit(caplog) -> None:
    model = tiny_model().train()
    ids, positions = _packed_batch(model)
    _loss_and_grads(model, ids, positions)
    short_ids, short_positions = ids[:1, :24], positions[:1, :24]
    with caplog.at_level("WARNING", logger="models.compile"):
        loss, grads = _loss_and_grads(model, short_ids, short_positions)
    assert "reached torch._dynamo.config.recompile_limit" in caplog.text
    set_compile(False)
    eager_loss, eager_grads = _loss_and_grads(model, short_ids, short_positions)
    assert rel_err(loss, eager_loss) < 1e-6
    for name, grad in grads.items():
        assert rel_err(grad, eager_grads[name]) < 1e-6, name
