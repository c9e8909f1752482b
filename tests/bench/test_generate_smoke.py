"""bench/generate.py --smoke end to end on CPU: JSON, plots, measured cache bytes equal to the analytic ones."""

import json

from bench.generate import main


def test_generate_benchmark_smoke(tmp_path):
    out = main(["--smoke", "--out", str(tmp_path / "gen.json")])
    results = json.loads(out.read_text())
    assert results["complete"] and not results["errors"], results["errors"]
    for name in ("student", "teacher"):
        c = results["cache_bytes"][name]
        assert c["measured_per_token"] == c["analytic_per_token"] > 0
        assert c["measured_constant"] == c["analytic_constant"]
        # Static decoder (eager on CPU) against the growing-cache / DynamicCache reference, same tokens.
        assert results["graph_check"][name]["max_rel_err"] < 1e-5
        assert {r["context"] for r in results["decode"] if r["model"] == name} == {64, 128}
        assert all(v["batch"] == 4 and v["capped"] for v in results["max_batch"][name].values())
    assert {r["model"] for r in results["prefill"]} == {"student", "teacher"}
    assert all(r["tokens_per_s"] > 0 for r in results["decode"])
    for suffix in ("throughput", "max_batch"):
        assert (tmp_path / f"gen_{suffix}.png").stat().st_size > 0


def test_benchmark_decode_steps_are_capturable_on_their_face():
    """Both decode steps (after one warmup step) run no host sync and make no tensor from host data."""
    import torch

    from bench.generate import build_models, student_decoder, teacher_decoder
    from tests.models.test_static_cache import HOST_OPS, _RecordOps

    student, teacher = build_models("smoke", "cpu", torch.float32)
    with torch.no_grad():
        for make, model in ((student_decoder, student), (teacher_decoder, teacher)):
            decoder = make(model, 2, 64, 16)
            decoder.step()
            with _RecordOps() as recorder:
                decoder.step()
            assert recorder.ops and not HOST_OPS & set(recorder.ops), (make.__name__, HOST_OPS & set(recorder.ops))
