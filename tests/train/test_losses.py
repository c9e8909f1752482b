"""Distillation losses: the chunked KD loss against a direct full-vocabulary computation written here
(values and gradients, fp64 and fp32), chunking invariance, known values, CE, teacher isolation, memory
bound, bf16; ILD against direct computations with padding excluded; config validation."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from train.losses import (
    ILDLossConfig,
    KDLossConfig,
    divergence_from_logits,
    ild_layer_loss,
    ild_loss,
    kd_loss,
    kd_loss_ref,
)

B, T, D, D_T, V = 2, 7, 16, 12, 50
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)]


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(dtype=torch.float64, seed=0, bias=False):
    """Student / teacher hidden states and heads (logits of std ~2) and targets with -100 in places."""
    g = torch.Generator().manual_seed(seed)
    x = {
        "student_hidden": torch.randn(B, T, D, generator=g, dtype=dtype),
        "student_head_weight": torch.randn(V, D, generator=g, dtype=dtype) * 0.5,
        "teacher_hidden": torch.randn(B, T, D_T, generator=g, dtype=dtype),
        "teacher_head_weight": torch.randn(V, D_T, generator=g, dtype=dtype) * 0.6,
    }
    if bias:
        x["student_head_bias"] = torch.randn(V, generator=g, dtype=dtype) * 0.3
        x["teacher_head_bias"] = torch.randn(V, generator=g, dtype=dtype) * 0.3
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :2] = -100  # masked prompt
    targets[0, 4] = -100  # document end
    targets[1, -1] = -100  # padding
    return x, targets


def _direct(x, targets, divergence, beta, temperature, scale_by_t2=True, kl_weight=1.0, ce_weight=0.0):
    """Independent full-vocab computation: (loss, D, CE) over valid tokens, one mean over the batch."""
    zs = x["student_hidden"] @ x["student_head_weight"].T
    zt = x["teacher_hidden"] @ x["teacher_head_weight"].T
    if "student_head_bias" in x:
        zs, zt = zs + x["student_head_bias"], zt + x["teacher_head_bias"]
    valid = targets != -100
    zs, zt, y = zs[valid], zt[valid], targets[valid]
    log_s, log_t = torch.log_softmax(zs / temperature, -1), torch.log_softmax(zt / temperature, -1)
    p_s, p_t = torch.softmax(zs / temperature, -1), torch.softmax(zt / temperature, -1)
    if divergence == "forward_kl":
        d = torch.sum(p_t * (log_t - log_s), -1)
    elif divergence == "reverse_kl":
        d = torch.sum(p_s * (log_s - log_t), -1)
    else:
        m = beta * p_t + (1 - beta) * p_s
        d = beta * torch.sum(p_t * (log_t - m.log()), -1) + (1 - beta) * torch.sum(p_s * (log_s - m.log()), -1)
    if scale_by_t2:
        d = d * temperature**2
    div = d.sum() / d.numel()
    ce = -torch.log_softmax(zs, -1)[torch.arange(len(y)), y].sum() / len(y)
    return kl_weight * div + ce_weight * ce, div, ce


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------- KD: correctness


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_kd_matches_direct(divergence, beta, temperature, dtype, tol):
    x, targets = _inputs(dtype, bias=True)
    student = [x["student_hidden"], x["student_head_weight"], x["student_head_bias"]]
    for t in student:
        t.requires_grad_(True)
    cfg = KDLossConfig(divergence, beta, temperature, kl_weight=0.7, ce_weight=0.4, chunk_tokens=3)
    out = kd_loss(**x, targets=targets, cfg=cfg)
    grads = _grads(out.loss, student)

    # Truth in fp64 from the same values.
    x64 = {k: v.detach().double().requires_grad_(k.startswith("student")) for k, v in x.items()}
    loss, div, ce = _direct(x64, targets, divergence, beta, temperature, kl_weight=0.7, ce_weight=0.4)
    ref_grads = _grads(loss, [x64["student_hidden"], x64["student_head_weight"], x64["student_head_bias"]])

    errs = {
        "loss": _rel(out.loss.double(), loss),
        "divergence": _rel(out.divergence.double(), div),
        "ce": _rel(out.ce.double(), ce),
        **{
            f"grad_{n}": _rel(g.double(), r)
            for n, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True)
        },
    }
    print(f"{divergence} beta={beta} T={temperature} {dtype}: max rel err {max(errs.values()):.2e} {errs}")
    assert out.loss.dtype == dtype and out.num_tokens == int((targets != -100).sum())
    assert max(errs.values()) < tol


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_kd_chunking_invariance(divergence, beta):
    x, targets = _inputs(torch.float64, seed=1, bias=True)
    student = [x["student_hidden"], x["student_head_weight"], x["student_head_bias"]]
    for t in student:
        t.requires_grad_(True)
    results = {}
    for chunk in (1, 3, 5, 1000):
        cfg = KDLossConfig(divergence, beta, temperature=2.0, ce_weight=0.5, chunk_tokens=chunk)
        out = kd_loss(**x, targets=targets, cfg=cfg)
        results[chunk] = (out.loss.detach(), out.top1_agreement, *_grads(out.loss, student))
    ref = kd_loss_ref(**x, targets=targets, cfg=cfg)  # the module's own unchunked autograd version
    results["ref"] = (ref.loss.detach(), ref.top1_agreement, *_grads(ref.loss, student))
    diff = max((a - b).abs().max().item() for key in results for a, b in zip(results[key], results[1000], strict=True))
    print(f"{divergence} beta={beta}: max diff over chunk sizes 1/3/5/1000 and the reference {diff:.2e}")
    assert diff < 1e-12


def test_kd_top1_agreement():
    x, targets = _inputs(torch.float64, seed=2)
    x["teacher_hidden"] = x["student_hidden"].clone()  # same hidden, a head that agrees on some rows only
    x["teacher_head_weight"] = x["student_head_weight"] + 0.5 * torch.randn(V, D, dtype=torch.float64)
    out = kd_loss(**x, targets=targets, cfg=KDLossConfig(chunk_tokens=4))
    valid = targets != -100
    zs = (x["student_hidden"] @ x["student_head_weight"].T)[valid]
    zt = (x["teacher_hidden"] @ x["teacher_head_weight"].T)[valid]
    expected = (zs.argmax(-1) == zt.argmax(-1)).double().mean()
    print(f"top-1 agreement {out.top1_agreement.item():.4f} expected {expected.item():.4f}")
    assert 0 < expected < 1 and torch.equal(out.top1_agreement, expected)


# ----------------------------------------------------------------------------------------- known values


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_identical_distributions_give_zero(divergence, beta):
    x, targets = _inputs(torch.float64, seed=3)
    x["teacher_hidden"], x["teacher_head_weight"] = x["student_hidden"].clone(), x["student_head_weight"].clone()
    out = kd_loss(**x, targets=targets, cfg=KDLossConfig(divergence, beta, temperature=2.0, chunk_tokens=4))
    print(f"{divergence} beta={beta}: D(p, p) = {out.divergence.item():.2e}")
    assert abs(out.divergence.item()) < 1e-14 and out.top1_agreement.item() == 1.0


def test_jsd_symmetric_and_bounded():
    a, b = torch.randn(64, V, dtype=torch.float64) * 3, torch.randn(64, V, dtype=torch.float64) * 3
    cfg = KDLossConfig("jsd", 0.5)
    d_ab, d_ba = divergence_from_logits(a, b, cfg), divergence_from_logits(b, a, cfg)
    print(f"JSD symmetry: max |JSD(a, b) - JSD(b, a)| {(d_ab - d_ba).abs().max().item():.2e}")
    assert torch.allclose(d_ab, d_ba, rtol=0, atol=1e-14)
    # Disjoint supports reach the bound log 2; nothing exceeds it.
    disjoint = torch.full((2, 4), -1e4, dtype=torch.float64)
    disjoint[0, :2] = 0
    disjoint[1, 2:] = 0
    bound = divergence_from_logits(disjoint[:1], disjoint[1:], cfg)
    print(f"JSD of disjoint supports {bound.item():.15f}, log 2 = {math.log(2):.15f}")
    assert abs(bound.item() - math.log(2)) < 1e-12 and d_ab.max() <= math.log(2)
    # Not symmetric away from 0.5.
    skew = KDLossConfig("jsd", 0.1)
    assert not torch.allclose(divergence_from_logits(a, b, skew), divergence_from_logits(b, a, skew))


def test_forward_kl_hand_computed():
    """Two tokens, two-word vocabulary: identity heads, hidden states = log-probabilities."""
    teacher = torch.tensor([[[0.75, 0.25], [0.5, 0.5]]], dtype=torch.float64).log()  # (1, 2, 2)
    student = torch.tensor([[[0.5, 0.5], [0.25, 0.75]]], dtype=torch.float64).log()
    eye = torch.eye(2, dtype=torch.float64)
    targets = torch.tensor([[0, 1]])
    kl_1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    kl_2 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    expected = (kl_1 + kl_2) / 2
    ce_expected = -(math.log(0.5) + math.log(0.75)) / 2
    out = kd_loss(student, eye, teacher, eye, targets, KDLossConfig(chunk_tokens=1))
    print(f"forward KL {out.divergence.item():.15f} expected {expected:.15f}; CE {out.ce.item():.15f}")
    assert abs(out.divergence.item() - expected) < 1e-15 and abs(out.ce.item() - ce_expected) < 1e-15
    # Reverse KL of the same pair, by hand.
    rev = (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)) / 2
    rev += (0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)) / 2
    out = kd_loss(student, eye, teacher, eye, targets, KDLossConfig("reverse_kl"))
    assert abs(out.divergence.item() - rev) < 1e-15


def test_jsd_endpoints_follow_trl():
    """beta = 0 is forward KL and beta = 1 reverse KL (the generalized JSD itself vanishes there)."""
    a, b = torch.randn(16, V, dtype=torch.float64), torch.randn(16, V, dtype=torch.float64)
    for beta, name in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd = divergence_from_logits(a, b, KDLossConfig("jsd", beta, temperature=2.0))
        kl = divergence_from_logits(a, b, KDLossConfig(name, temperature=2.0))
        assert torch.equal(jsd, kl)
    x, targets = _inputs(torch.float64, seed=4)
    for beta, name in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        got = kd_loss(**x, targets=targets, cfg=KDLossConfig("jsd", beta, chunk_tokens=5)).loss
        assert abs(got.item() - _direct(x, targets, name, 0.5, 1.0)[0].item()) < 1e-12


def test_t2_scaling():
    x, targets = _inputs(torch.float64, seed=5)
    on = kd_loss(**x, targets=targets, cfg=KDLossConfig(temperature=3.0, chunk_tokens=4))
    off = kd_loss(**x, targets=targets, cfg=KDLossConfig(temperature=3.0, scale_by_t2=False, chunk_tokens=4))
    print(f"T=3: D with T^2 {on.divergence.item():.6f}, without {off.divergence.item():.6f}")
    assert abs(on.divergence.item() - 9 * off.divergence.item()) < 1e-12
    assert on.ce.item() == off.ce.item()  # CE is at T = 1 either way


# ---------------------------------------------------------------------------------------------- CE, weights


def test_ce_matches_cross_entropy_and_weights_combine_linearly():
    x, targets = _inputs(torch.float64, seed=6, bias=True)
    logits = x["student_hidden"] @ x["student_head_weight"].T + x["student_head_bias"]
    ce = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
    student = [x["student_hidden"], x["student_head_weight"], x["student_head_bias"]]
    for t in student:
        t.requires_grad_(True)

    def run(kl_weight, ce_weight):
        cfg = KDLossConfig("jsd", 0.3, 1.5, kl_weight=kl_weight, ce_weight=ce_weight, chunk_tokens=4)
        out = kd_loss(**x, targets=targets, cfg=cfg)
        return out, _grads(out.loss, student)

    div_only, g_div = run(1.0, 0.0)
    ce_only, g_ce = run(0.0, 1.0)
    both, g_both = run(0.3, 2.5)
    print(f"CE {both.ce.item():.15f} vs F.cross_entropy {ce.item():.15f}")
    assert abs(both.ce.item() - ce.item()) < 1e-13
    assert abs(ce_only.loss.item() - ce.item()) < 1e-13 and abs(div_only.loss - div_only.divergence) < 1e-15
    assert abs(both.loss.item() - (0.3 * div_only.loss.item() + 2.5 * ce_only.loss.item())) < 1e-13
    diff = max((gb - (0.3 * gd + 2.5 * gc)).abs().max().item() for gb, gd, gc in zip(g_both, g_div, g_ce, strict=True))
    print(f"gradient linearity max diff {diff:.2e}")
    assert diff < 1e-13


# ---------------------------------------------------------------------------------------- autograd edges


def test_teacher_gets_no_gradient_and_zero_tokens_stay_connected():
    x, targets = _inputs(torch.float32, seed=7, bias=True)
    for t in x.values():
        t.requires_grad_(True)
    kd_loss(**x, targets=targets, cfg=KDLossConfig(ce_weight=1.0, chunk_tokens=3)).loss.backward()
    assert all(x[k].grad is None for k in x if k.startswith("teacher"))
    assert all(x[k].grad is not None and x[k].grad.abs().sum() > 0 for k in x if k.startswith("student"))

    none = torch.full_like(targets, -100)
    out = kd_loss(**x, targets=none, cfg=KDLossConfig("jsd", ce_weight=1.0))
    assert out.loss.item() == 0 and out.loss.grad_fn is not None and out.num_tokens == 0
    assert out.top1_agreement.item() == 0
    hidden, weight = torch.autograd.grad(out.loss, [x["student_hidden"], x["student_head_weight"]])
    assert hidden.abs().sum() == 0 and weight.abs().sum() == 0


def test_no_grad_path_matches():
    x, targets = _inputs(torch.float64, seed=8)
    cfg = KDLossConfig("reverse_kl", temperature=2.0, ce_weight=0.2, chunk_tokens=4)
    x["student_hidden"].requires_grad_(True)
    with_grad = kd_loss(**x, targets=targets, cfg=cfg)
    with torch.no_grad():
        without = kd_loss(**x, targets=targets, cfg=cfg)
    assert without.loss.grad_fn is None and with_grad.loss.grad_fn is not None
    assert abs(with_grad.loss.item() - without.loss.item()) < 1e-14


def test_grad_output_scales_gradients():
    x, targets = _inputs(torch.float64, seed=9)
    x["student_head_weight"].requires_grad_(True)
    cfg = KDLossConfig(chunk_tokens=4)
    (g1,) = _grads(kd_loss(**x, targets=targets, cfg=cfg).loss, [x["student_head_weight"]])
    (g3,) = _grads(-3.0 * kd_loss(**x, targets=targets, cfg=cfg).loss, [x["student_head_weight"]])
    assert torch.allclose(g3, -3.0 * g1, rtol=1e-14, atol=0)


# -------------------------------------------------------------------------------------------------- memory


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and the per-chunk gradient work alike)."""

    def __init__(self):
        super().__init__()
        self.bytes, self.shape = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.bytes:
                self.bytes, self.shape = t.numel() * t.element_size(), tuple(t.shape)
        return out


def _rss_and_reset_peak() -> int | None:
    """Current RSS in bytes after resetting the peak (VmHWM); None where /proc does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status("VmRSS")
    except OSError:
        return None


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def test_memory_stays_bounded_by_the_chunk():
    """4096 tokens, V = 32000, chunk_tokens = 512: the full fp32 logits would be 524 MB per model."""
    n, vocab, dim, chunk = 4096, 32000, 32, 512
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, n, dim, generator=g).requires_grad_(True)
    weight = (torch.randn(vocab, dim, generator=g) * 0.2).requires_grad_(True)
    t_hidden, t_weight = torch.randn(1, n, dim, generator=g), torch.randn(vocab, dim, generator=g) * 0.2
    targets = torch.randint(0, vocab, (1, n), generator=g)
    full = n * vocab * 4

    with _LargestTensor():  # the first use of a dispatch mode allocates a little once: keep it out of the peak
        kd_loss(hidden[:, :1], weight, t_hidden[:, :1], t_weight, targets[:, :1], KDLossConfig()).loss.backward()
    weight.grad = None
    base = _rss_and_reset_peak()
    with _LargestTensor() as largest:
        out = kd_loss(hidden, weight, t_hidden, t_weight, targets, KDLossConfig(chunk_tokens=chunk))
        out.loss.backward()
    peak = None if base is None else _proc_status("VmHWM") - base
    peak_text = "n/a" if peak is None else f"{peak / 2**20:.0f} MiB ({peak / full:.2f} of it)"
    print(
        f"full logits {full / 2**20:.0f} MiB; largest tensor {largest.shape} {largest.bytes / 2**20:.0f} MiB; "
        f"peak extra RSS {peak_text}"
    )
    assert torch.isfinite(out.loss) and weight.grad is not None
    assert largest.bytes <= chunk * vocab * 4  # nothing bigger than one chunk of fp32 logits ever exists
    if peak is not None:  # about three chunk-sized tensors live at once (forward KL)
        assert peak < full / 2


# ---------------------------------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:3])
def test_bf16_close_to_fp32(divergence, beta):
    x, targets = _inputs(torch.float32, seed=10)
    cfg = KDLossConfig(divergence, beta, temperature=2.0, ce_weight=0.5, chunk_tokens=4)
    ref = kd_loss(**x, targets=targets, cfg=cfg)
    xb = {k: v.bfloat16().requires_grad_(k.startswith("student")) for k, v in x.items()}
    out = kd_loss(**xb, targets=targets, cfg=cfg)
    out.loss.backward()
    rel = abs(out.loss.item() - ref.loss.item()) / ref.loss.item()
    print(f"{divergence}: bf16 {out.loss.item():.5f} fp32 {ref.loss.item():.5f} rel {rel:.2e}")
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss) and rel < 2e-2
    assert xb["student_head_weight"].grad.dtype == torch.bfloat16
    assert torch.isfinite(xb["student_head_weight"].grad.float()).all()

    # Autocast (bf16-mixed): fp32 parameters, bf16 matmuls, fp32 gradients.
    x32 = {k: v.clone().requires_grad_(k.startswith("student")) for k, v in x.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = kd_loss(**x32, targets=targets, cfg=cfg)
    mixed.loss.backward()
    assert abs(mixed.loss.item() - ref.loss.item()) / ref.loss.item() < 2e-2
    assert x32["student_head_weight"].grad.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------- ILD


def _ild_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(11)
    student = torch.randn(3, 6, 8, generator=g, dtype=dtype)
    teacher = torch.randn(3, 6, 8, generator=g, dtype=dtype)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 1:] = False
    return student, teacher, mask


def test_ild_matches_direct_and_ignores_padding():
    student, teacher, mask = _ild_inputs()
    diff = student[mask] - teacher[mask]  # (N, H)
    direct = {"mse": (diff**2).mean(), "l2": diff.norm(dim=-1).mean()}
    for kind in ("mse", "l2"):
        s = student.clone().requires_grad_(True)
        got = ild_loss(s, teacher, mask, kind)
        (grad,) = torch.autograd.grad(got, s)
        # Padded positions changed (to garbage, NaN included): same loss, same gradient, zero there.
        s2, t2 = student.clone(), teacher.clone()
        s2[~mask], t2[~mask] = float("nan"), 1e6
        s2.requires_grad_(True)
        got2 = ild_loss(s2, t2, mask.long(), kind)
        (grad2,) = torch.autograd.grad(got2, s2)
        print(f"ild {kind}: {got.item():.12f} direct {direct[kind].item():.12f} padded-changed {got2.item():.12f}")
        assert abs(got.item() - direct[kind].item()) < 1e-14 and got.item() == got2.item()
        assert torch.equal(grad, grad2) and grad[~mask].abs().sum() == 0


def test_ild_edges():
    student, teacher, mask = _ild_inputs()
    # Identical states: zero loss, zero (not NaN) gradient for the L2 norm.
    s = teacher.clone().requires_grad_(True)
    for kind in ("mse", "l2"):
        (grad,) = torch.autograd.grad(ild_loss(s, teacher, mask, kind), s)
        assert torch.isfinite(grad).all() and grad.abs().sum() == 0
    # No real tokens: zero, still connected to the student.
    s = student.clone().requires_grad_(True)
    none = ild_loss(s, teacher, torch.zeros_like(mask), "l2")
    assert none.item() == 0 and none.grad_fn is not None
    # bf16 in, fp32 accumulation out; the teacher gets no gradient.
    sb, tb = student.bfloat16().requires_grad_(True), teacher.bfloat16().requires_grad_(True)
    got = ild_loss(sb, tb, mask, "mse")
    direct = ((sb.detach().float() - tb.detach().float())[mask] ** 2).mean()
    got.backward()
    assert got.dtype == torch.float32 and abs(got.item() - direct.item()) < 1e-6 and tb.grad is None
    with pytest.raises(ValueError, match="ild.loss='cos'"):
        ild_loss(student, teacher, mask, "cos")
    with pytest.raises(ValueError, match="must be"):
        ild_loss(student, teacher[:, :5], mask, "mse")


def test_ild_layer_loss_combines_terms():
    student, teacher, mask = _ild_inputs()
    mixer_s, mixer_t = student.flip(-1), teacher * 0.5
    cfg = ILDLossConfig("l2", mixer_weight=0.3, output_weight=2.0)
    out = ild_layer_loss(student, teacher, mixer_s, mixer_t, mask, cfg)
    expected = 2.0 * ild_loss(student, teacher, mask, "l2") + 0.3 * ild_loss(mixer_s, mixer_t, mask, "l2")
    assert abs(out.loss.item() - expected.item()) < 1e-14
    s = student.clone().requires_grad_(True)
    no_output = ild_layer_loss(s, teacher, mixer_s, mixer_t, mask, ILDLossConfig(output_weight=0.0))
    assert no_output.output.item() > 0 and no_output.loss.grad_fn is None  # weight 0: reported, not in graph


# -------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"divergence": "kl"}, "kd.divergence='kl' is invalid; allowed: forward_kl | reverse_kl | jsd"),
        ({"jsd_beta": 1.5}, "kd.jsd_beta=1.5 is invalid"),
        ({"jsd_beta": -0.1}, "kd.jsd_beta=-0.1 is invalid"),
        ({"temperature": 0.0}, "kd.temperature=0.0 is invalid"),
        ({"temperature": -1}, "kd.temperature=-1 is invalid"),
        ({"kl_weight": -1.0}, "kd.kl_weight=-1.0 is invalid"),
        ({"ce_weight": -0.5}, "kd.ce_weight=-0.5 is invalid"),
        ({"chunk_tokens": 0}, "kd.chunk_tokens=0 is invalid"),
        ({"chunk_tokens": 2.5}, "kd.chunk_tokens=2.5 is invalid"),
        ({"scale_by_t2": "yes"}, "kd.scale_by_t2='yes' is invalid"),
    ],
)
def test_kd_config_validation(kwargs, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        KDLossConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"loss": "cos"}, "ild.loss='cos'"),
        ({"mixer_weight": -1.0}, "ild.mixer_weight"),
        ({"output_weight": -2}, "ild.output_weight"),
    ],
)
def test_ild_config_validation(kwargs, key):
    with pytest.raises(ValueError, match=key):
        ILDLossConfig(**kwargs)


def test_kd_shape_checks():
    x, targets = _inputs(torch.float64)
    x["teacher_head_weight"] = x["teacher_head_weight"][:-1]
    with pytest.raises(ValueError, match="vocabularies differ"):
        kd_loss(**x, targets=targets, cfg=KDLossConfig())
    x, targets = _inputs(torch.float64)
    with pytest.raises(ValueError, match="must be targets"):
        kd_loss(**x, targets=targets[:, :-1], cfg=KDLossConfig())


@pytest.mark.parametrize("bad", [V, -1])
def test_kd_targets_outside_the_vocabulary_are_refused(bad):
    # On GPU the fused kernel would read out of bounds instead of failing: checked once, before any chunk.
    x, targets = _inputs(torch.float32)
    targets[1, 2] = bad
    with pytest.raises(ValueError, match=r"kd_loss: targets must be -100 or token ids in \[0, 50\)"):
        kd_loss(**x, targets=targets, cfg=KDLossConfig(chunk_tokens=4))
