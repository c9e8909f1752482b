"""The top-k KD loss (offline KD from a teacher cache) against references written here from full fp64 logits: at
k = V it is the full-vocabulary forward KL (values and gradients); at k < V it is the bucketed KL computed the obvious
way (1 - sum for the rest masses, autograd), never above the full KL and closer to it as k grows (printed)."""

from __future__ import annotations

import pytest
import torch

from train.losses import KDLossConfig, kd_topk_loss, teacher_topk

B, T, D, V = 2, 7, 16, 50


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.3
    teacher_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2.5
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :2] = -100
    targets[1, -1] = -100
    return hidden, weight, bias, teacher_logits, targets


def _reference(hidden, weight, bias, teacher_logits, targets, k, temperature, kl_weight, ce_weight):
    """(loss, bucketed D, full D, CE) over the valid tokens, fp64, autograd; rest masses as 1 - sum."""
    valid = targets != -100
    z = (hidden @ weight.T + bias)[valid]  # (N, V)
    zt = teacher_logits[valid]
    logq = torch.log_softmax(z / temperature, -1)
    logp = torch.log_softmax(zt / temperature, -1)
    full = (logp.exp() * (logp - logq)).sum(-1)
    logp_s, ids = logp.topk(k, -1)
    logq_s = logq.gather(1, ids)
    p_rest = (1 - logp_s.exp().sum(-1)).clamp_min(0)
    q_rest = (1 - logq_s.exp().sum(-1)).clamp_min(1e-300)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-300).log() - q_rest.log()), 0)
    bucketed = (logp_s.exp() * (logp_s - logq_s)).sum(-1) + rest
    ce = torch.nn.functional.cross_entropy(z, targets[valid], reduction="mean")
    t2 = temperature**2
    loss = kl_weight * t2 * (full if k == V else bucketed).mean() + ce_weight * ce
    return loss, t2 * bucketed.mean(), t2 * full.mean(), ce


def _cached(teacher_logits, k, temperature, dtype=torch.float64):
    ids, logp, rest = teacher_topk(teacher_logits.reshape(-1, V), k, temperature)
    return ids.reshape(B, T, k), logp.reshape(B, T, k).to(dtype), rest.reshape(B, T).to(dtype)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("k", [V, 20, 5, 1])
def test_topk_loss_matches_references(k, temperature):
    hidden, weight, bias, teacher_logits, targets = _inputs()
    cfg = KDLossConfig(temperature=temperature, kl_weight=0.7, ce_weight=0.4, chunk_tokens=3)
    student = [hidden.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()]
    out = kd_topk_loss(student[0], student[1], *_cached(teacher_logits, k, temperature), targets, cfg, student[2])
    grads = torch.autograd.grad(out.loss, student)

    ref_in = [hidden.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()]
    loss, bucketed, full, ce = _reference(*ref_in, teacher_logits, targets, k, temperature, 0.7, 0.4)
    ref_grads = torch.autograd.grad(loss, ref_in)
    errs = {
        "loss": abs(out.loss - loss).item(),
        "div": abs(out.divergence - bucketed).item(),
        "ce": abs(out.ce - ce).item(),
        **{f"grad{i}": (g - r).abs().max().item() for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True))},
    }
    gap = (full - out.divergence).item()
    print(
        f"k={k} T={temperature}: full D {full.item():.5f}, top-k D {out.divergence.item():.5f}, gap {gap:.2e}; {errs}"
    )
    assert max(errs.values()) < 1e-10
    assert gap >= -1e-12  # the log-sum inequality: lumping tokens never raises the KL
    if k == V:
        assert abs(gap) < 1e-10  # at k = V the cached loss is the full forward KL


def test_gap_shrinks_with_k_and_fp32_cache():
    """Nested top-k sets refine the buckets, so the KL grows towards the full one; an fp32 cache (fp32 student)
    stays within 1e-5 of the fp64 value, an fp16 cache's log-probs within 1e-2."""
    hidden, weight, bias, teacher_logits, targets = _inputs(seed=1)
    cfg = KDLossConfig(chunk_tokens=4)
    divs = [
        kd_topk_loss(hidden, weight, *_cached(teacher_logits, k, 1.0), targets, cfg, bias).divergence
        for k in (1, 4, 16, V)
    ]
    print("top-k D at k=1,4,16,V:", [f"{d.item():.5f}" for d in divs])
    assert all(a <= b + 1e-12 for a, b in zip(divs, divs[1:], strict=False))
    assert divs[0] < divs[-1] - 1e-3  # and the gap is real at small k: this test can fail
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 1e-2)):
        ids, logp, rest = _cached(teacher_logits, 16, 1.0, dtype)
        low = kd_topk_loss(hidden.float(), weight.float(), ids, logp, rest.float(), targets, cfg, bias.float())
        err = abs(low.divergence.double() - divs[2]).item()
        print(f"{dtype} cache: |D - fp64 D| = {err:.2e}")
        assert err < tol


def test_teacher_topk_against_direct_values():
    logits = _inputs()[3].reshape(-1, V)
    ids, logp, rest = teacher_topk(logits, 7, 2.0)
    direct = torch.log_softmax(logits / 2.0, -1)
    order = direct.argsort(-1, descending=True)[:, :7]
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), order)
    assert torch.allclose(logp, direct.gather(1, order), atol=1e-12)
    assert torch.allclose(rest, torch.log1p(-direct.gather(1, order).exp().sum(-1)), atol=1e-10)
    assert torch.isneginf(teacher_topk(logits, V, 1.0)[2]).all()  # no mass outside the whole vocabulary


def test_no_grad_path_and_other_divergences():
    hidden, weight, bias, teacher_logits, targets = _inputs()
    cached = _cached(teacher_logits, 8, 1.0)
    cfg = KDLossConfig(ce_weight=0.5, chunk_tokens=5)
    with torch.no_grad():
        plain = kd_topk_loss(hidden, weight, *cached, targets, cfg, bias)
    tracked = kd_topk_loss(hidden.requires_grad_(), weight, *cached, targets, cfg, bias)
    assert torch.equal(plain.loss, tracked.loss.detach()) and plain.num_tokens == int((targets != -100).sum())
    with pytest.raises(
        ValueError, match=r"^kd.divergence='jsd' is invalid with kd.teacher_cache .*allowed: forward_kl$"
    ):
        kd_topk_loss(hidden, weight, *cached, targets, KDLossConfig(divergence="jsd"), bias)
