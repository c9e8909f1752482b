"""A saved student loads through AutoModelForCausalLM with trust_remote_code, without importing our code."""

import subprocess
import sys
import textwrap

import torch

from .tiny import tiny_model


def test_save_and_load_with_auto_class(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    torch.save({"ids": ids, "logits": expected}, tmp_path / "check.pt")
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "hybrid.py", "config.py", "ssd.py", "kernels.py"} <= files
    # A fresh interpreter whose sys.path does not hold this repository: only the exported files are used.
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path = [p for p in sys.path if p not in ("", {str(_repo_root())!r})]
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert "models" not in sys.modules, "our package must not be imported"
        check = torch.load({str(tmp_path / "check.pt")!r})
        with torch.no_grad():
            logits = model(check["ids"]).logits
        assert torch.allclose(logits, check["logits"], atol=1e-5), (logits - check["logits"]).abs().max()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "ties lost"
        out = model.generate(check["ids"], max_new_tokens=4, do_sample=False)
        assert out.shape == (2, 13)
        print("ok", type(model).__module__)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok transformers_modules" in result.stdout


def _repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[2]
