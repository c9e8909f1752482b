"""models/ssd.py: the chunked SSD scan and the decoding step against the token-by-token fp64 recurrence."""

import pytest
import torch
import torch.nn.functional as F

from models.ssd import selective_state_update_ref, ssd_chunk_scan_ref, ssd_recurrence_ref

F64 = torch.float64


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.to(F64) - ref.to(F64)).norm() / ref.to(F64).norm()).item()


def _max(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.to(F64) - ref.to(F64)).abs().max().item()


def _inputs(
    batch: int,
    seqlen: int,
    nheads: int,
    headdim: int = 4,
    ngroups: int = 1,
    dstate: int = 6,
    *,
    softplus: bool = True,
    D_shape: str | None = "hp",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """fp64 inputs; per-token decays ~0.01-0.3, so state survives across chunks and the passing is tested."""
    torch.manual_seed(seed)
    if softplus:  # raw pre-activation around -2 -> softplus ~0.1
        dt = torch.randn(batch, seqlen, nheads, dtype=F64) * 0.5 - 2.0
    else:
        dt = torch.rand(batch, seqlen, nheads, dtype=F64) * 0.3 + 0.02
    D_dims = {"hp": (nheads, headdim), "h": (nheads,)}.get(D_shape)
    D = None if D_dims is None else torch.randn(*D_dims, dtype=F64)
    return dict(
        x=torch.randn(batch, seqlen, nheads, headdim, dtype=F64),
        dt=dt,
        A=-torch.rand(nheads, dtype=F64) * 1.5 - 0.1,
        B=torch.randn(batch, seqlen, ngroups, dstate, dtype=F64),
        C=torch.randn(batch, seqlen, ngroups, dstate, dtype=F64),
        D=D,
        z=torch.randn(batch, seqlen, nheads, headdim, dtype=F64),
        dt_bias=torch.randn(nheads, dtype=F64) * 0.3,
        initial_states=torch.randn(batch, nheads, headdim, dstate, dtype=F64),
    )


def _seq_idx(doc_lens_per_row: list[list[int]], offset: int = 0) -> torch.Tensor:
    """Packed-batch seq_idx: document i of a row gets id offset + i."""
    rows = [torch.cat([torch.full((n,), offset + i) for i, n in enumerate(row)]) for row in doc_lens_per_row]
    return torch.stack(rows).int()


# seqlen, chunk, nheads, ngroups, D shape, z, dt_bias, softplus, dt_limit, initial_states
CASES = [
    (37, 16, 4, 1, "hp", True, True, True, (0.0, float("inf")), True),
    (100, 32, 4, 2, "h", True, True, True, (0.05, 0.3), True),
    (1, 16, 4, 4, None, False, False, False, (0.0, float("inf")), True),
    (32, 32, 4, 4, "hp", False, True, True, (0.0, float("inf")), False),  # seqlen == chunk
    (10, 32, 2, 1, "h", True, False, False, (0.0, 0.1), True),  # seqlen < chunk
    (45, 8, 6, 2, "hp", True, True, False, (0.08, float("inf")), False),
]


@pytest.mark.parametrize("seqlen,chunk,nheads,ngroups,D_shape,use_z,use_bias,softplus,dt_limit,use_init", CASES)
def test_chunk_scan_matches_recurrence_fp64(
    seqlen, chunk, nheads, ngroups, D_shape, use_z, use_bias, softplus, dt_limit, use_init
):
    inp = _inputs(2, seqlen, nheads, ngroups=ngroups, softplus=softplus, D_shape=D_shape)
    kw = dict(
        D=inp["D"],
        z=inp["z"] if use_z else None,
        dt_bias=inp["dt_bias"] if use_bias else None,
        initial_states=inp["initial_states"] if use_init else None,
        dt_softplus=softplus,
        dt_limit=dt_limit,
        return_final_states=True,
    )
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk)
    out, state = ssd_chunk_scan_ref(*args, **kw)
    ref, ref_state = ssd_recurrence_ref(*args, **kw)
    print(
        f"fp64 L={seqlen} chunk={chunk}: out max {_max(out, ref):.2e} (rel {_rel(out, ref):.1e}),",
        f"state max {_max(state, ref_state):.2e}",
    )
    assert out.shape == ref.shape and out.dtype == F64 and state.shape == ref_state.shape
    assert _rel(out, ref) < 1e-6
    assert _rel(state, ref_state) < 1e-6


@pytest.mark.parametrize("chunk", [8, 7])
@pytest.mark.parametrize("use_init", [False, True])
def test_packed_documents_match_separate_runs(chunk, use_init):
    # Row 0 has boundaries at 5 (inside a chunk) and 16 (a chunk edge for chunk=8); row 1 at 8 (edge) and 11;
    # row 1's ids start at 3: the first document is whatever seq_idx[:, 0] is.
    lens = [[5, 11, 8], [8, 3, 13]]
    inp = _inputs(2, 24, 4, ngroups=2)
    seq_idx = torch.cat([_seq_idx(lens[:1]), _seq_idx(lens[1:], offset=3)])
    kw = dict(D=inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True, return_final_states=True)
    init = inp["initial_states"] if use_init else None
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk)
    out, state = ssd_chunk_scan_ref(*args, seq_idx=seq_idx, initial_states=init, **kw)

    ref, ref_state = ssd_recurrence_ref(*args, seq_idx=seq_idx, initial_states=init, **kw)
    print(f"packed vs recurrence: out max {_max(out, ref):.2e}, state max {_max(state, ref_state):.2e}")
    assert _rel(out, ref) < 1e-6 and _rel(state, ref_state) < 1e-6

    worst = 0.0
    for b, row in enumerate(lens):
        start = 0
        for i, n in enumerate(row):
            sl = slice(start, start + n)
            doc = {k: inp[k][b : b + 1, sl] for k in ("x", "dt", "B", "C")}
            doc_init = init[b : b + 1] if (init is not None and i == 0) else None  # only the first document
            alone, alone_state = ssd_chunk_scan_ref(
                doc["x"], doc["dt"], inp["A"], doc["B"], doc["C"], chunk, initial_states=doc_init, **kw
            )
            assert _rel(out[b : b + 1, sl], alone) < 1e-6
            worst = max(worst, _max(out[b : b + 1, sl], alone))
            start += n
        assert _rel(state[b : b + 1], alone_state) < 1e-6  # final state = the last document's own
    print(f"packed vs separate documents: out max {worst:.2e}")


def test_documents_are_isolated_and_comparison_is_sensitive():
    lens = [[6, 13, 9]]
    inp = _inputs(1, 28, 4, ngroups=2)
    seq_idx = _seq_idx(lens)
    kw = dict(D=inp["D"], z=inp["z"], dt_bias=inp["dt_bias"], dt_softplus=True, seq_idx=seq_idx)
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 8)
    out = ssd_chunk_scan_ref(*args, **kw)
    ref = ssd_recurrence_ref(*args, **kw)
    assert _rel(out, ref) < 1e-6

    # Changing the first document must leave the others untouched (up to rounding of the shared cumsum).
    x2, dt2, B2 = inp["x"].clone(), inp["dt"].clone(), inp["B"].clone()
    x2[:, :6] += 1.0
    dt2[:, :6] += 1.0
    B2[:, :6] += 1.0
    out2 = ssd_chunk_scan_ref(x2, dt2, inp["A"], B2, inp["C"], 8, **kw)
    assert _max(out2[:, 6:], out[:, 6:]) < 1e-12
    assert _max(out2[:, :6], out[:, :6]) > 1e-2

    # The tolerance used everywhere (1e-6) catches a missing reset, a slightly wrong A, a wrong decay sign,
    # dropped initial states and swapped B/C.
    no_reset = ssd_chunk_scan_ref(*args, **{**kw, "seq_idx": None})
    wrong_A = ssd_chunk_scan_ref(inp["x"], inp["dt"], inp["A"] * 1.001, inp["B"], inp["C"], 8, **kw)
    sign_flip = ssd_recurrence_ref(inp["x"], inp["dt"], -inp["A"], inp["B"], inp["C"], 8, **kw)
    swapped = ssd_chunk_scan_ref(inp["x"], inp["dt"], inp["A"], inp["C"], inp["B"], 8, **kw)
    errs = {
        name: _rel(o, ref)
        for name, o in [("no_reset", no_reset), ("A*1.001", wrong_A), ("-A", sign_flip), ("B<->C", swapped)]
    }
    kw_init = {**kw, "initial_states": inp["initial_states"], "seq_idx": None}
    with_init = ssd_recurrence_ref(*args, **kw_init)
    errs["no_init"] = _rel(ssd_chunk_scan_ref(*args, **{**kw_init, "initial_states": None}), with_init)
    print("perturbed rel errors:", {k: f"{v:.1e}" for k, v in errs.items()})
    assert all(v > 1e-5 for v in errs.values())


def test_fp32_matches_fp64_recurrence():
    lens = [[40, 25, 35], [100]]
    inp = _inputs(2, 100, 8, headdim=8, ngroups=2, dstate=16)
    kw64 = dict(
        D=inp["D"],
        z=inp["z"],
        dt_bias=inp["dt_bias"],
        initial_states=inp["initial_states"],
        seq_idx=_seq_idx(lens),
        dt_softplus=True,
        return_final_states=True,
    )
    ref, ref_state = ssd_recurrence_ref(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 32, **kw64)
    f32 = {k: v.float() for k, v in inp.items()}
    kw32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw64.items()}
    out, state = ssd_chunk_scan_ref(f32["x"], f32["dt"], f32["A"], f32["B"], f32["C"], 32, **kw32)
    print(
        f"fp32: out rel {_rel(out, ref):.2e}, max {_max(out, ref):.2e};",
        f"state rel {_rel(state, ref_state):.2e}",
    )
    assert out.dtype == torch.float32 and state.dtype == torch.float32
    assert _rel(out, ref) < 1e-4 and _rel(state, ref_state) < 1e-4

    bf, bf_state = ssd_chunk_scan_ref(*(f32[k].bfloat16() for k in ("x", "dt", "A", "B", "C")), 32, **kw32)
    print(f"bf16 inputs: out rel {_rel(bf, ref):.2e}")
    assert bf.dtype == torch.bfloat16 and bf_state.dtype == torch.float32 and _rel(bf, ref) < 5e-2


def test_fp32_stable_with_strong_decay():
    # |dt*A| ~ 25 per token: exp of the (masked) upper-triangle differences would be exp(+1500) = inf.
    inp = _inputs(1, 64, 2, softplus=False)
    A = torch.full((2,), -50.0, dtype=F64)
    ref = ssd_recurrence_ref(inp["x"], inp["dt"] + 0.5, A, inp["B"], inp["C"], 64, D=inp["D"])
    leaves = [t.float().requires_grad_() for t in (inp["x"], inp["dt"] + 0.5, A, inp["B"], inp["C"])]
    out = ssd_chunk_scan_ref(*leaves, 64, D=inp["D"].float())
    out.sum().backward()
    assert _rel(out, ref) < 1e-4
    assert all(torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.parametrize("packed", [False, True])
def test_gradients_match_recurrence(packed):
    inp = _inputs(2, 21, 4, headdim=3, ngroups=2, dstate=5)
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]
    seq_idx = _seq_idx([[5, 9, 7], [8, 13]]) if packed else None
    torch.manual_seed(1)
    w_out, w_state = torch.randn_like(inp["x"]), torch.randn_like(inp["initial_states"])

    def grads(fn):
        leaves = {k: inp[k].clone().requires_grad_() for k in names}
        out, state = fn(
            leaves["x"],
            leaves["dt"],
            leaves["A"],
            leaves["B"],
            leaves["C"],
            8,
            D=leaves["D"],
            z=leaves["z"],
            dt_bias=leaves["dt_bias"],
            initial_states=leaves["initial_states"],
            seq_idx=seq_idx,
            dt_softplus=True,
            dt_limit=(0.05, 0.2),
            return_final_states=True,
        )
        loss = (out * w_out).sum() + (state * w_state).sum()
        return dict(zip(names, torch.autograd.grad(loss, list(leaves.values())), strict=True))

    got, want = grads(ssd_chunk_scan_ref), grads(ssd_recurrence_ref)
    errs = {k: _rel(got[k], want[k]) for k in names}
    print("grad rel errors:", {k: f"{v:.1e}" for k, v in errs.items()})
    for k in names:
        assert torch.isfinite(got[k]).all() and want[k].norm() > 0, k
        assert errs[k] < 1e-6, k


_TIME_KEYS = ("x", "dt", "B", "C", "z")


def _scan(inp, t0, t1, initial_states=None):
    """ssd_chunk_scan_ref on tokens [t0, t1) -> (out, final state)."""
    sl = {k: inp[k][:, t0:t1] for k in _TIME_KEYS}
    return ssd_chunk_scan_ref(
        sl["x"],
        sl["dt"],
        inp["A"],
        sl["B"],
        sl["C"],
        8,
        D=inp["D"],
        z=sl["z"],
        dt_bias=inp["dt_bias"],
        initial_states=initial_states,
        dt_softplus=True,
        return_final_states=True,
    )


def _step(inp, state, t0, t1):
    """selective_state_update_ref over tokens [t0, t1), broadcasting the per-head scan params per channel."""
    h, p, n = state.shape[1:]
    A = inp["A"][:, None, None].expand(h, p, n)
    D = inp["D"][:, None].expand(h, p) if inp["D"].dim() == 1 else inp["D"]
    dt_bias = inp["dt_bias"][:, None].expand(h, p)
    outs = []
    for t in range(t0, t1):
        dt = inp["dt"][:, t, :, None].expand(-1, h, p)
        outs.append(
            selective_state_update_ref(
                state,
                inp["x"][:, t],
                dt,
                A,
                inp["B"][:, t],
                inp["C"][:, t],
                D=D,
                z=inp["z"][:, t],
                dt_bias=dt_bias,
                dt_softplus=True,
            )
        )
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("D_shape", ["h", "hp"])
def test_step_reproduces_scan(D_shape):
    seqlen, k = 19, 11
    inp = _inputs(2, seqlen, 4, ngroups=2, D_shape=D_shape)
    full, full_state = _scan(inp, 0, seqlen)

    state = torch.zeros_like(inp["initial_states"])
    stepped = _step(inp, state, 0, seqlen)  # updates `state` in place
    print(f"step vs scan: out max {_max(stepped, full):.2e}, state max {_max(state, full_state):.2e}")
    assert _rel(stepped, full) < 1e-10 and _rel(state, full_state) < 1e-10

    # Prefill a prefix with the scan, then decode the rest step by step (the inference pattern) ...
    _, state = _scan(inp, 0, k)
    tail = _step(inp, state, k, seqlen)
    assert _rel(tail, full[:, k:]) < 1e-10 and _rel(state, full_state) < 1e-10
    # ... or continue with the scan from the prefix state.
    _, state = _scan(inp, 0, k)
    tail, state = _scan(inp, k, seqlen, initial_states=state)
    assert _rel(tail, full[:, k:]) < 1e-10 and _rel(state, full_state) < 1e-10


def test_step_in_place_dtype_and_headless_layout():
    torch.manual_seed(0)
    b, h, p, n = 2, 4, 3, 5
    state = torch.randn(b, h, p, n).bfloat16()
    before = state.clone()
    x, dt, z = torch.randn(b, h, p), torch.randn(b, h, p), torch.randn(b, h, p)
    A, B, C = -torch.rand(h, p, n), torch.randn(b, 1, n), torch.randn(b, 1, n)
    out = selective_state_update_ref(state, x, dt, A, B, C, z=z, dt_softplus=True, dt_limit=(0.0, 0.5))
    assert state.dtype == torch.bfloat16 and not torch.equal(state, before)
    assert out.shape == (b, h, p) and out.dtype == torch.float32
    dt_eff = F.softplus(dt).clamp(max=0.5)
    want = before.float() * torch.exp(dt_eff[..., None] * A) + (dt_eff * x)[..., None] * B[:, :, None]
    assert _max(state, want) < 5e-2

    # mamba-ssm's head-less layout (batch, dim, dstate) == one head.
    s3 = torch.randn(b, p, n, dtype=F64)
    s4 = s3.clone()[:, None]
    args = (torch.randn(b, p, dtype=F64), torch.rand(b, p, dtype=F64), -torch.rand(p, n, dtype=F64))
    BC = (torch.randn(b, n, dtype=F64), torch.randn(b, n, dtype=F64))
    D, dt_bias = torch.randn(p, dtype=F64), torch.randn(p, dtype=F64)
    o3 = selective_state_update_ref(s3, *args, *BC, D=D, dt_bias=dt_bias, dt_softplus=True)
    o4 = selective_state_update_ref(
        s4,
        args[0][:, None],
        args[1][:, None],
        args[2][None],
        BC[0][:, None],
        BC[1][:, None],
        D=D[None],
        dt_bias=dt_bias[None],
        dt_softplus=True,
    )
    assert torch.equal(o3, o4[:, 0]) and torch.equal(s3, s4[:, 0])
