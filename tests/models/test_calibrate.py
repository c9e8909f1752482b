"""Calibration of the recurrent mixers' output scale (models/output_fit.py, models/init/calibrate.py) and the
constant gate of the Mamba2 init, on tiny random teachers saved and loaded the way users load Hub models."""

import copy

import pytest
import torch

from models.documents import documents_from_positions
from models.init import convert_teacher
from models.init.calibrate import calibrate_student
from models.mixer_mamba2 import GATE_BIAS
from models.output_fit import RIDGE
from models.teachers import adapter_for, load_teacher

from .test_init import saved_teacher
from .tiny import rel_err

KINDS = ["mamba", "gdn"]


def _student(tmp_path, kinds=("mamba", "gdn", "mla"), teacher="qwen2", **mamba):
    teacher, spec = load_teacher(saved_teacher(teacher, tmp_path))
    mla = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
    student, report = convert_teacher(teacher, spec, mixer_types=list(kinds), mamba=dict(mamba), mla=mla)
    return teacher, student, report


def _probe(teacher, layer: int, seed: int, length: int = 24):
    """A normed hidden input (1, T, D) and the teacher attention's output on it."""
    hidden = torch.randn(1, length, teacher.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    positions = torch.arange(length)[None]
    return hidden, positions, adapter_for(teacher).attention_forward(teacher, layer, hidden, positions)


def _fit(student, layer: int):
    mixing = student.model.layers[layer]
    return mixing, mixing.kind.calibration(mixing.mixer)


@pytest.mark.parametrize("kind", KINDS)
def test_output_norm_fit_is_the_least_squares_solution(kind, tmp_path):
    """The normal equations with the elementwise product against lstsq on the explicit design matrix."""
    teacher, student, _ = _student(tmp_path, kinds=(kind,) * 3)
    mixing, fit = _fit(student, 1)
    cos_sin = [student.model.rope(torch.arange(24)[None])]
    rows, targets = [], []
    for seed in (0, 1):
        hidden, positions, target = _probe(teacher, 1, seed)
        docs = documents_from_positions(positions)
        fit.add(hidden, *cos_sin[0], docs, target, torch.ones(1, 24))
        # The features n_t, independently: the norm's weight set to 1 and no output projection.
        saved_weight, saved_proj = fit.norm.weight.detach().clone(), fit.out_proj
        with torch.no_grad():
            fit.norm.weight.fill_(1.0)
            setattr(mixing.mixer, "out_proj" if kind == "mamba" else "o_proj", torch.nn.Identity())
            features = mixing.kind.call(mixing.mixer, hidden, *cos_sin[0], docs, None)[0].double()  # (T, d_inner)
            setattr(mixing.mixer, "out_proj" if kind == "mamba" else "o_proj", saved_proj)
            fit.norm.weight.copy_(saved_weight)
        wo = saved_proj.weight.double()
        rows += [wo * n for n in features]  # W_o diag(n_t): (D, d_inner) per token
        targets.append(target[0].double())
    design, y = torch.cat(rows), torch.cat(targets).flatten()
    ridge = RIDGE * (design.T @ design).diagonal().mean()
    augmented = torch.cat([design, ridge.sqrt() * torch.eye(design.shape[1], dtype=torch.float64)])
    toward = ridge.sqrt() * saved_weight.double()  # the ridge pulls toward the weight as initialized
    expected = torch.linalg.lstsq(augmented, torch.cat([y, toward])).solution
    got = fit.solve()
    print(f"{kind}: normal equations vs lstsq rel err {rel_err(got, expected):.1e}")
    assert rel_err(got, expected) < 1e-6
    # The reported error after the fit is the mixer's real output error with the written weight.
    report = fit.apply()
    squared, norm = 0.0, 0.0
    for seed in (0, 1):
        hidden, positions, target = _probe(teacher, 1, seed)
        with torch.no_grad():
            out = mixing.kind.call(mixing.mixer, hidden, *cos_sin[0], documents_from_positions(positions), None)
        squared, norm = squared + (out - target).pow(2).sum().item(), norm + target.pow(2).sum().item()
    print(f"{kind}: calibration error {report['calib_rel_err_before']:.3f} -> {report['calib_rel_err_after']:.3f}")
    assert report["calib_rel_err_after"] == pytest.approx((squared / norm) ** 0.5, rel=1e-4)
    assert report["calib_rel_err_after"] < report["calib_rel_err_before"]


def test_padding_takes_no_part_in_the_fit(tmp_path):
    teacher, student, _ = _student(tmp_path)
    hidden, positions, target = _probe(teacher, 0, 0)
    cos, sin = student.model.rope(positions)
    docs = documents_from_positions(positions)
    _, alone = _fit(student, 0)
    alone.add(hidden, cos, sin, docs, target, torch.ones(1, 24))
    _, padded = _fit(student, 0)
    garbage = torch.full_like(target, 1e3)
    mask = torch.ones(1, 30)
    mask[0, 24:] = 0
    long_hidden = torch.cat([hidden, torch.randn(1, 6, hidden.shape[-1])], 1)
    long_docs = documents_from_positions(torch.arange(30)[None])
    cos30, sin30 = student.model.rope(torch.arange(30)[None])
    padded.add(long_hidden, cos30, sin30, long_docs, torch.cat([target, garbage[:, :6]], 1), mask)
    assert rel_err(padded.solve(), alone.solve()) < 1e-5  # causal: the padded tail changes nothing before it
    # nor the reported errors (the garbage targets would dominate both sums)
    assert padded.sq_err_before == pytest.approx(alone.sq_err_before, rel=1e-5)
    assert padded.sq_target == pytest.approx(alone.sq_target, rel=1e-6)


def test_calibrate_student_fits_every_recurrent_layer_on_teacher_text(tmp_path):
    teacher, student, _ = _student(tmp_path)
    ids = torch.randint(0, 101, (2, 32), generator=torch.Generator().manual_seed(3))
    positions = torch.cat([torch.arange(20), torch.arange(12)]).expand(2, 32)  # two packed documents per row
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": positions}
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    rows = calibrate_student(teacher, student, [batch, batch])
    assert [(r["layer"], r["mixer"]) for r in rows] == [(0, "mamba"), (1, "gdn")]  # MLA reproduces attention
    for row in rows:
        assert row["calib_rel_err_after"] < row["calib_rel_err_before"], row
    changed = {name for name, p in student.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {"model.layers.0.mamba.norm.weight", "model.layers.1.gdn.o_norm.weight"}


def test_constant_gate_leaves_the_gated_norm_a_plain_rmsnorm(tmp_path):
    """gate_init=constant: silu(z) is one number for every channel and token, which the norm divides out; the
    default needs in_proj's bias (added for teachers without q/k/v biases); gate_init=random keeps MambaInLlama's."""
    _, student, _ = _student(tmp_path, teacher="llama")  # no q/k/v biases
    mamba = student.model.layers[0].mamba
    d_inner = mamba.dims.d_inner
    assert mamba.in_proj.bias is not None
    assert torch.all(mamba.in_proj.weight[:d_inner] == 0) and torch.all(mamba.in_proj.bias[:d_inner] == GATE_BIAS)
    y = torch.randn(2, 5, d_inner)
    z = mamba.in_proj(torch.randn(2, 5, 64))[..., :d_inner]
    with torch.no_grad():
        expected = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + mamba.norm.eps)
        assert rel_err(mamba.norm(y, z), expected) < 1e-5
    _, random_gate, _ = _student(tmp_path / "random", teacher="llama", gate_init="random")
    m = random_gate.model.layers[0].mamba
    assert m.in_proj.bias is None  # the teacher's (no q/k/v bias)
    z = m.in_proj(torch.randn(2, 5, 64))[..., :d_inner]
    with torch.no_grad():
        assert rel_err(m.norm(y, z), expected) > 0.1


def test_a_constant_gate_without_a_bias_and_an_unknown_gate_init_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"student.mamba.in_proj_bias=False does not fit .*gate_init='constant'"):
        _student(tmp_path, teacher="llama", in_proj_bias=False)
    with pytest.raises(ValueError, match=r"mamba.gate_init='zero' is invalid"):
        _student(tmp_path, teacher="llama", gate_init="zero")


def test_calibration_under_bf16_autocast_keeps_fp32_sums(tmp_path):
    """The init stage calibrates under the trainer's autocast: the statistics must not be summed in bf16."""
    teacher, student, _ = _student(tmp_path, kinds=("mamba", "mamba", "mla"))
    ids = torch.randint(0, 101, (8, 256), generator=torch.Generator().manual_seed(5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(256).expand(8, 256)}
    fp32 = copy.deepcopy(student)
    want = calibrate_student(teacher, fp32, [batch])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = calibrate_student(teacher, student, [batch])
    for a, b in zip(want, got, strict=True):
        print(
            f"layer {a['layer']}: error after the fit fp32 {a['calib_rel_err_after']:.5f}, "
            f"bf16 autocast {b['calib_rel_err_after']:.5f}"
        )
        assert b["calib_rel_err_after"] == pytest.approx(a["calib_rel_err_after"], rel=2e-3)
