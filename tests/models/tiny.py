"""Tiny hybrid students for tests (random weights, every code path exercised)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from models import HybridConfig, HybridForCausalLM


def tiny_config(mixers=("mla", "mamba", "mla", "mamba"), **overrides) -> HybridConfig:
    """A small hybrid whose shapes exercise every code path: GQA (4 heads, 2 KV heads), Mamba / GDN chunks of 8."""
    mla = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16)
    mamba = dict(d_state=16, headdim=16, chunk_size=8)
    gdn = dict(head_k_dim=16, head_v_dim=16, chunk_size=8)
    mla.update(overrides.pop("mla", {}))
    mamba.update(overrides.pop("mamba", {}))
    gdn.update(overrides.pop("gdn", {}))
    kwargs = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=len(mixers),
        num_attention_heads=4,
        num_key_value_heads=2,
        mixer_types=list(mixers),
        mla=mla,
        mamba=mamba,
        gdn=gdn,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    kwargs.update(overrides)
    return HybridConfig(**kwargs)


def tiny_model(dtype=torch.float32, **kwargs) -> HybridForCausalLM:
    model = HybridForCausalLM(tiny_config(**kwargs)).to(dtype).eval()
    _randomize_mamba(model)
    return model


def _randomize_mamba(model: HybridForCausalLM) -> None:
    """Larger dt and varied D so state carried across tokens (and documents) matters in the outputs; GDN decays of
    ~0.6-0.99 per token and betas spread over (0, 1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gdn.A_log"):
                p.uniform_(-3.0, -1.0)
            elif name.endswith("gdn.b_proj.bias"):
                p.uniform_(-2.0, 2.0)
            elif name.endswith("dt_bias"):
                p.uniform_(-1.0, 1.0)
            elif name.endswith(".D"):
                p.uniform_(0.5, 1.5)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run_exported(folder: Path, body: str) -> None:
    """Run `body` in a fresh interpreter whose sys.path does not hold this repository, after it has loaded the student
    saved in `folder` through AutoModelForCausalLM(trust_remote_code=True) as `model` (checking that our package was
    not imported) and `folder/check.pt` as `check`; it must exit 0 with the model's code from the exported files."""
    repo = str(Path(__file__).resolve().parents[2])
    preamble = f"""
        import sys, torch
        sys.path = [p for p in sys.path if p not in ("", {repo!r})]
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert "models" not in sys.modules, "our package must not be imported"
        check = torch.load({str(folder / "check.pt")!r})
        """
    script = textwrap.dedent(preamble) + textwrap.dedent(body) + '\nprint("ok", type(model).__module__)\n'
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(folder / "modules"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok transformers_modules" in result.stdout
