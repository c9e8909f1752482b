"""models/kernels.py's guarded import of mamba-ssm's Triton ops when the package's `__init__` cannot run (its
Mamba-1 CUDA extension is missing: every CPU or MAMBA_SKIP_CUDA_BUILD install). mamba-ssm itself needs CUDA to
install, so a package with the same layout and the same failing `__init__` stands in for it; the GPU suite runs
the real one (tests/gpu/test_kernels_gpu.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]

MODULES = {
    # as the real one: some Triton modules load, then the CUDA extension a skipped build lacks is missing
    "__init__.py": "from mamba_ssm.ops.triton import layer_norm\nimport selective_scan_cuda\n",
    "ops/triton/layer_norm.py": "",
    "ops/__init__.py": "",
    "ops/triton/__init__.py": "",
    "ops/triton/ssd_combined.py": "def mamba_chunk_scan_combined(*args, **kwargs):\n    return 'scan'\n",
    "ops/triton/selective_state_update.py": "def selective_state_update(*args, **kwargs):\n    return 'step'\n",
    "ops/triton/layernorm_gated.py": "def rmsnorm_fn(*args, **kwargs):\n    return 'norm'\n",
    "ops/triton/tuned.py": (
        "import triton\n\n"
        "@triton.autotune(configs=[triton.Config({'BLOCK': b}, num_stages=s) for b in (64, 16, 32) for s in (1, 2)],"
        " key=[])\n"
        "@triton.jit\n"
        "def kernel(x, BLOCK: 'tl.constexpr'):\n"
        "    pass\n"
    ),
}

SCRIPT = """
import sys
try:  # a version probe, as bench.train once did: it fails and leaves the ops' modules registered
    import mamba_ssm
except ImportError:
    pass
from models import kernels
assert kernels.triton_chunk_scan()() == "scan" and kernels.triton_state_update()() == "step"
assert kernels.triton_rmsnorm_fn()() == "norm"
print("cut", kernels.limit_autotune_configs(keep=2))
tuned = sys.modules["mamba_ssm.ops.triton.tuned"].kernel
print("kept", sorted((c.kwargs["BLOCK"], c.num_stages) for c in tuned.configs))
"""


def test_ops_import_and_autotune_limit_survive_a_failed_package_import(tmp_path):
    for name, text in MODULES.items():
        path = tmp_path / "mamba_ssm" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    env = {"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cut 4" in result.stdout  # 6 configs, the 2 lightest kept
    assert "kept [(16, 1), (16, 2)]" in result.stdout  # lightest: num_stages x BLOCK, ties in order
