"""GPU: the fused Triton KD kernel against its torch twin at Llama-3's 128K vocabulary, per chunk and through
`kd_loss` (values and gradients under bf16 autocast). Errors are printed before the asserts."""

import pytest
import torch

from tests.train.test_kd_kernel import CASES, compare_fused_with_torch
from train.losses import KDLossConfig, kd_kernel, kd_loss

VOCAB = 128_256


def test_kernel_available():
    assert kd_kernel.triton_available()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-b{c[1]}-T{c[2]}-ce{c[4]}")
def test_fused_chunk_matches_torch(case, dtype):
    errors = compare_fused_with_torch(case, n=48, vocab=VOCAB, dtype=dtype, device="cuda", block=4096)
    print(case, dtype, errors)


def test_fused_chunk_ties_resolve_to_the_first_maximum():
    compare_fused_with_torch(CASES[1], n=48, vocab=VOCAB, dtype=torch.bfloat16, device="cuda", block=4096, ties=True)


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
def test_kd_loss_fused_matches_torch_path_under_autocast(divergence, beta, monkeypatch):
    g = torch.Generator(device="cuda").manual_seed(0)
    n_rows, length, dim, dim_t = 2, 700, 256, 384
    hidden = torch.randn(n_rows, length, dim, device="cuda", generator=g)
    weight = torch.randn(VOCAB, dim, device="cuda", generator=g) * 0.1
    bias = torch.randn(VOCAB, device="cuda", generator=g) * 0.1
    t_hidden = torch.randn(n_rows, length, dim_t, device="cuda", generator=g).bfloat16()
    t_weight = (torch.randn(VOCAB, dim_t, device="cuda", generator=g) * 0.1).bfloat16()
    targets = torch.randint(0, VOCAB, (n_rows, length), device="cuda", generator=g)
    targets[0, :50] = -100

    launches = []
    fused_chunk = kd_kernel.kd_chunk_fused
    monkeypatch.setattr(kd_kernel, "kd_chunk_fused", lambda *a, **k: launches.append(1) or fused_chunk(*a, **k))

    def run(use_triton: bool):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        b = bias.clone().requires_grad_()
        cfg = KDLossConfig(divergence, beta, temperature=1.5, ce_weight=0.3, chunk_tokens=512, use_triton=use_triton)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = kd_loss(h, w, t_hidden, t_weight, targets, cfg, student_head_bias=b)
        out.loss.backward()
        return out, h.grad, w.grad, b.grad

    fused = run(True)
    chunks = -(-int((targets != -100).sum()) // 512)
    assert len(launches) == chunks, (len(launches), chunks)  # the fused path ran, once per chunk
    torch_path = run(False)
    assert len(launches) == chunks  # and use_triton=False never takes it
    for name, a, b in [
        ("loss", fused[0].loss, torch_path[0].loss),
        ("ce", fused[0].ce, torch_path[0].ce),
        ("hidden grad", fused[1], torch_path[1]),
        ("weight grad", fused[2], torch_path[2]),
        ("bias grad", fused[3], torch_path[3]),
    ]:
        err = ((a.double() - b.double()).norm() / b.double().norm()).item()
        print(divergence, name, err)
        assert err < (1e-5 if name in ("loss", "ce") else 2e-2), (name, err)
    assert fused[0].top1_agreement == torch_path[0].top1_agreement
