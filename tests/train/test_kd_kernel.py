"""The fused Triton KD chunk kernel against its torch twin (`_chunk_terms_torch`), on CPU through Triton's
interpreter. Skips where Triton is not installed (CI); tests/gpu/test_kd_kernel_gpu.py runs the same
checks compiled on CUDA at a 128K vocabulary."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from train.losses import KDLossConfig, kd_kernel
from train.losses.kd import _chunk_terms_torch

CASES = [  # (divergence, jsd_beta, temperature, kl_weight, ce_weight)
    ("forward_kl", 0.5, 1.0, 1.0, 0.0),
    ("forward_kl", 0.5, 2.0, 0.7, 0.4),
    ("reverse_kl", 0.5, 1.5, 1.0, 0.3),
    ("jsd", 0.3, 1.0, 1.0, 0.0),
    ("jsd", 0.5, 2.0, 0.5, 1.0),
]


def chunk_inputs(n: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0, dim: int = 32):
    """(hidden, weight, None) for student and teacher, logits of std ~3 (peaked rows, as trained models give)
    and correlated between the two; targets. Logits come from a matmul, as in the loss, so the torch twin
    takes the same inputs without a (V, V) identity."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, dim, generator=g)
    w = torch.randn(vocab, dim, generator=g) * (3 / dim**0.5)
    w_t = 0.8 * w + torch.randn(vocab, dim, generator=g) * (2 / dim**0.5)
    to = dict(dtype=dtype, device=device)
    targets = torch.randint(0, vocab, (n,), generator=g).to(device)
    return (h.to(**to), w.to(**to), None), (h.to(**to), w_t.to(**to), None), targets


def with_tied_maxima(student, teacher, columns=(5, 7, 250)):
    """Zero head rows and a bias that make `columns` the student's exactly tied maximum in every row (inside one
    tile and across tiles at block 128), the last of them the teacher's: the first maximum must win, as in
    torch.argmax, so the two never agree."""
    weight = student[1].clone()
    weight[list(columns)] = 0.0  # logits = bias exactly, whatever the matmul's summation order
    bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    bias[list(columns)] = 30.0
    t_bias = torch.zeros_like(bias)
    t_bias[columns[-1]] = 30.0
    return (student[0], weight, bias), (teacher[0], teacher[1], t_bias)


def compare_fused_with_torch(
    case, n: int, vocab: int, dtype: torch.dtype, device: str, block: int, ties: bool = False
) -> dict:
    """Runs both paths on the same chunk; asserts agreement and returns the relative errors."""
    divergence, beta, temperature, kl_weight, ce_weight = case
    cfg = KDLossConfig(divergence, beta, temperature, kl_weight=kl_weight, ce_weight=ce_weight)
    coefs = (kl_weight * cfg.t2_factor / temperature / n, ce_weight / n)
    student, teacher, targets = chunk_inputs(n, vocab, dtype, device)
    if ties:
        student, teacher = with_tied_maxima(student, teacher)
    want = _chunk_terms_torch(student, teacher, targets, cfg, coefs, torch.float32)
    z, zt = torch.nn.functional.linear(*student), torch.nn.functional.linear(*teacher)
    div, ce, agree, grad = kd_kernel.kd_chunk_fused(
        z, zt, targets, cfg.resolved_divergence, beta, temperature, coefs, block=block
    )
    got = (div * cfg.t2_factor, ce, agree.bool(), grad)
    if ties:
        assert not got[2].any(), "a tie must resolve to the first maximum"
    errors = {
        name: ((got[i].double() - want[i].double()).norm() / want[i].double().norm()).item()
        for name, i in (("divergence", 0), ("ce", 1), ("grad", 3))
    }
    assert torch.equal(got[2], want[2]), "top-1 agreement differs"
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: only the gradient's final rounding differs
    assert errors["divergence"] < 1e-5 and errors["ce"] < 1e-5, errors
    assert errors["grad"] < tol, errors
    return errors


def _interpreter_numpy_fix() -> None:
    """Triton 3.6's interpreter calls int() on 1-element arrays (loop bounds), which NumPy >= 2.4 refuses."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def scalar_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = scalar_index


def run_interpreted() -> None:
    """Every check below, on CPU; TRITON_INTERPRET=1 must be set before Triton is imported (see the test)."""
    _interpreter_numpy_fix()
    for case in CASES:  # vocab 300 in tiles of 128: the last tile is partial
        print(case, compare_fused_with_torch(case, n=6, vocab=300, dtype=torch.float32, device="cpu", block=128))
    for case in CASES[1:3]:
        print(case, "bf16", compare_fused_with_torch(case, 6, 300, torch.bfloat16, "cpu", block=128))
        print(case, "ties", compare_fused_with_torch(case, 6, 300, torch.float32, "cpu", block=128, ties=True))

    student, teacher, targets = chunk_inputs(4, 200, torch.float32, "cpu")
    z, zt = torch.nn.functional.linear(*student), torch.nn.functional.linear(*teacher)
    before = z.clone()
    div, ce, agree, grad = kd_kernel.kd_chunk_fused(z, zt, targets, "forward_kl", 0.5, 1.0, None, block=64)
    assert grad is None and torch.equal(z, before), "without coefs the logits must stay untouched"
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(before, targets, reduction="none"))

    try:
        kd_kernel.kd_chunk_fused(z, zt, targets, "jsd", 1.0, 1.0, (1.0, 0.0))
    except ValueError as error:
        assert "0 < beta < 1" in str(error)
    else:
        raise AssertionError("jsd at beta 1 must be refused")
    print("interpreted checks passed")


def test_fused_chunk_matches_torch_in_triton_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    code = "from tests.train.test_kd_kernel import run_interpreted; run_interpreted()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    print(done.stdout)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "interpreted checks passed" in done.stdout
