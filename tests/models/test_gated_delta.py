"""models/gated_delta.py: the chunked gated delta rule and the decoding step against the paper's token-by-token
recurrence in fp64 (S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t)."""

import pytest
import torch
import torch.nn.functional as F

from models.gated_delta import gated_delta_rule_chunk_ref, gated_delta_rule_recurrent_ref, gated_delta_rule_step_ref

F64 = torch.float64


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.to(F64) - ref.to(F64)).norm() / ref.to(F64).norm()).item()


def _inputs(batch: int, length: int, heads: int = 3, dk: int = 6, dv: int = 5, seed: int = 0) -> dict:
    """fp64 inputs; decays ~0.6-1 per token and betas over (0, 1), so state crosses chunks and the erase term acts."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        q=F.normalize(torch.randn(batch, length, heads, dk, generator=g, dtype=F64), dim=-1),
        k=F.normalize(torch.randn(batch, length, heads, dk, generator=g, dtype=F64), dim=-1),
        v=torch.randn(batch, length, heads, dv, generator=g, dtype=F64),
        g=-torch.rand(batch, length, heads, generator=g, dtype=F64) * 0.5,
        beta=torch.rand(batch, length, heads, generator=g, dtype=F64),
        initial_state=torch.randn(batch, heads, dk, dv, generator=g, dtype=F64),
    )


def _args(inp: dict) -> tuple:
    return tuple(inp[key] for key in ("q", "k", "v", "g", "beta"))


def _seq_idx(lengths_per_row: list[list[int]], offset: int = 0) -> torch.Tensor:
    rows = [torch.cat([torch.full((n,), offset + i) for i, n in enumerate(row)]) for row in lengths_per_row]
    return torch.stack(rows).int()


# length, chunk, initial state, scale
CASES = [(37, 8, True, 1.0), (32, 32, False, 1.0), (10, 16, True, 0.25), (1, 4, True, 1.0), (45, 7, False, 1.0)]


@pytest.mark.parametrize("length,chunk,use_init,scale", CASES)
def test_chunked_matches_recurrence_fp64(length, chunk, use_init, scale):
    inp = _inputs(2, length)
    init = inp["initial_state"] if use_init else None
    kw = dict(scale=scale, initial_state=init, return_final_state=True)
    out, state = gated_delta_rule_chunk_ref(*_args(inp), chunk, **kw)
    ref, ref_state = gated_delta_rule_recurrent_ref(*_args(inp), **kw)
    print(f"T={length} chunk={chunk}: out rel {_rel(out, ref):.1e}, state rel {_rel(state, ref_state):.1e}")
    assert out.shape == ref.shape == (2, length, 3, 5) and out.dtype == F64 and state.shape == (2, 3, 6, 5)
    assert _rel(out, ref) < 1e-10 and _rel(state, ref_state) < 1e-10


@pytest.mark.parametrize("chunk", [8, 5])
@pytest.mark.parametrize("use_init", [False, True])
def test_packed_documents_match_documents_alone(chunk, use_init):
    # Row 0: boundaries at 5 (inside a chunk) and 16 (a chunk edge for chunk 8); row 1 at 8 and 11, ids from 3.
    lens = [[5, 11, 8], [8, 3, 13]]
    inp = _inputs(2, 24)
    seq_idx = torch.cat([_seq_idx(lens[:1]), _seq_idx(lens[1:], offset=3)])
    init = inp["initial_state"] if use_init else None
    kw = dict(initial_state=init, seq_idx=seq_idx, return_final_state=True)
    out, state = gated_delta_rule_chunk_ref(*_args(inp), chunk, **kw)
    ref, ref_state = gated_delta_rule_recurrent_ref(*_args(inp), **kw)
    print(f"packed vs recurrence: out rel {_rel(out, ref):.1e}, state rel {_rel(state, ref_state):.1e}")
    assert _rel(out, ref) < 1e-10 and _rel(state, ref_state) < 1e-10
    worst = 0.0
    for b, row in enumerate(lens):
        start = 0
        for i, n in enumerate(row):
            doc = {key: inp[key][b : b + 1, start : start + n] for key in ("q", "k", "v", "g", "beta")}
            doc_init = init[b : b + 1] if (init is not None and i == 0) else None  # only the first document
            alone, alone_state = gated_delta_rule_recurrent_ref(
                *_args(doc), initial_state=doc_init, return_final_state=True
            )
            worst = max(worst, _rel(out[b : b + 1, start : start + n], alone))
            start += n
        assert _rel(state[b : b + 1], alone_state) < 1e-10  # the final state is the last document's own
    print(f"packed vs documents alone: worst out rel {worst:.1e}")
    assert worst < 1e-10


def test_tolerance_catches_plausible_mistakes():
    """The 1e-10 used above is far below what a missing reset, a slightly wrong decay or beta, the delta rule's
    erase term dropped (plain gated linear attention), swapped q/k or a dropped initial state produce."""
    inp = _inputs(1, 28)
    seq_idx = _seq_idx([[6, 13, 9]])
    kw = dict(initial_state=inp["initial_state"], seq_idx=seq_idx)
    ref = gated_delta_rule_recurrent_ref(*_args(inp), **kw)
    q, k, v, g, beta = _args(inp)
    no_erase = torch.zeros_like(ref)  # gated linear attention: h_t = alpha_t h_{t-1} + beta_t k_t v_t^T
    for b in range(1):
        h = inp["initial_state"][b].clone()
        for t in range(28):
            if t in (6, 19):
                h = torch.zeros_like(h)
            h = (
                torch.exp(g[b, t])[:, None, None] * h
                + beta[b, t][:, None, None] * k[b, t][..., None] * v[b, t][:, None]
            )
            no_erase[b, t] = torch.einsum("hkv,hk->hv", h, q[b, t])
    errs = {
        "no reset": _rel(gated_delta_rule_chunk_ref(*_args(inp), 8, initial_state=inp["initial_state"]), ref),
        "g*1.001": _rel(gated_delta_rule_chunk_ref(q, k, v, g * 1.001, beta, 8, **kw), ref),
        "beta*1.001": _rel(gated_delta_rule_chunk_ref(q, k, v, g, beta * 1.001, 8, **kw), ref),
        "q<->k": _rel(gated_delta_rule_chunk_ref(k, q, v, g, beta, 8, **kw), ref),
        "no init": _rel(gated_delta_rule_chunk_ref(*_args(inp), 8, seq_idx=seq_idx), ref),
        "no erase": _rel(no_erase, ref),
    }
    print("perturbed rel errors:", {name: f"{e:.1e}" for name, e in errs.items()})
    assert all(e > 1e-5 for e in errs.values())


def test_fp32_and_bf16_match_fp64_recurrence():
    inp = _inputs(2, 100, heads=4, dk=16, dv=16)
    seq_idx = _seq_idx([[40, 25, 35], [100]])
    kw = dict(initial_state=inp["initial_state"], seq_idx=seq_idx, return_final_state=True)
    ref, ref_state = gated_delta_rule_recurrent_ref(*_args(inp), **kw)
    f32 = {key: t.float() for key, t in inp.items()}
    out, state = gated_delta_rule_chunk_ref(*_args(f32), 32, **{**kw, "initial_state": f32["initial_state"]})
    print(f"fp32: out rel {_rel(out, ref):.1e}, state rel {_rel(state, ref_state):.1e}")
    assert out.dtype == torch.float32 and state.dtype == torch.float32
    assert _rel(out, ref) < 1e-5 and _rel(state, ref_state) < 1e-5
    bf16 = tuple(t.bfloat16() for t in _args(f32))
    out, state = gated_delta_rule_chunk_ref(*bf16, 32, **{**kw, "initial_state": f32["initial_state"]})
    print(f"bf16 inputs: out rel {_rel(out, ref):.1e}")
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32 and _rel(out, ref) < 3e-2


def test_strong_decay_is_finite_and_exact():
    """|g| ~ 25 per token: exp of the unmasked upper-triangle differences would overflow to inf."""
    inp = _inputs(1, 32)
    inp["g"] = inp["g"] - 25.0
    ref = gated_delta_rule_recurrent_ref(*_args(inp))
    leaves = [t.float().requires_grad_() for t in _args(inp)]
    out = gated_delta_rule_chunk_ref(*leaves, 32)
    out.sum().backward()
    assert _rel(out, ref) < 1e-5
    assert all(torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.parametrize("packed", [False, True])
def test_gradients_match_recurrence(packed):
    inp = _inputs(2, 19, dk=4, dv=3)
    names = ["q", "k", "v", "g", "beta", "initial_state"]
    seq_idx = _seq_idx([[5, 9, 5], [8, 11]]) if packed else None
    gen = torch.Generator().manual_seed(1)
    w_out = torch.randn(2, 19, 3, 3, generator=gen, dtype=F64)
    w_state = torch.randn(2, 3, 4, 3, generator=gen, dtype=F64)

    def grads(fn):
        leaves = {key: inp[key].clone().requires_grad_() for key in names}
        out, state = fn(
            *(leaves[key] for key in names[:5]),
            6,
            initial_state=leaves["initial_state"],
            seq_idx=seq_idx,
            return_final_state=True,
        )
        loss = (out * w_out).sum() + (state * w_state).sum()
        return dict(zip(names, torch.autograd.grad(loss, list(leaves.values())), strict=True))

    got, want = grads(gated_delta_rule_chunk_ref), grads(gated_delta_rule_recurrent_ref)
    errs = {key: _rel(got[key], want[key]) for key in names}
    print("grad rel errors:", {key: f"{e:.1e}" for key, e in errs.items()})
    for key in names:
        assert want[key].norm() > 0 and errs[key] < 1e-9, key


def test_step_reproduces_chunked_prefill_and_continuation():
    inp = _inputs(2, 19)
    full, full_state = gated_delta_rule_chunk_ref(*_args(inp), 8, return_final_state=True)
    prefix = {key: t[:, :11] for key, t in inp.items() if key != "initial_state"}
    _, state = gated_delta_rule_chunk_ref(*_args(prefix), 8, return_final_state=True)
    before = state.clone()
    steps = [
        gated_delta_rule_step_ref(state, *(inp[key][:, t] for key in ("q", "k", "v", "g", "beta")))
        for t in range(11, 19)
    ]
    tail = torch.stack(steps, dim=1)
    print(f"step vs chunked: out rel {_rel(tail, full[:, 11:]):.1e}, state rel {_rel(state, full_state):.1e}")
    assert not torch.equal(state, before)  # updated in place
    assert _rel(tail, full[:, 11:]) < 1e-10 and _rel(state, full_state) < 1e-10
    rest = {key: t[:, 11:] for key, t in inp.items() if key != "initial_state"}
    tail, state = gated_delta_rule_chunk_ref(*_args(rest), 8, initial_state=before, return_final_state=True)
    assert _rel(tail, full[:, 11:]) < 1e-10 and _rel(state, full_state) < 1e-10
