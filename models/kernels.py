"""Optional mamba-ssm Triton kernels, imported once and guarded.

mamba-ssm's package `__init__` imports its Mamba-1 CUDA extension `selective_scan_cuda`, which Mamba2
never calls and which a build with MAMBA_SKIP_CUDA_BUILD=TRUE (or a CPU machine) lacks. When that import
fails we register a bare `mamba_ssm` package (its path only, no `__init__` code) and import the pure
Triton modules beneath it. Every caller keeps a pure-torch path (models/ssd.py, models/norm.py) for CPU
tensors and for environments without mamba-ssm or triton.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from functools import cache
from typing import Any


def _import_triton_module(name: str) -> Any | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        pass
    spec = importlib.util.find_spec("mamba_ssm") if "mamba_ssm" not in sys.modules else None
    if spec is None or not spec.submodule_search_locations:
        return None
    package = types.ModuleType("mamba_ssm")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["mamba_ssm"] = package
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


@cache
def _triton_ops() -> dict[str, Callable] | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    combined = _import_triton_module("mamba_ssm.ops.triton.ssd_combined")
    step = _import_triton_module("mamba_ssm.ops.triton.selective_state_update")
    norm = _import_triton_module("mamba_ssm.ops.triton.layernorm_gated")
    if combined is None or step is None or norm is None:
        return None
    return {
        "chunk_scan": combined.mamba_chunk_scan_combined,
        "state_update": step.selective_state_update,
        "rmsnorm": norm.rmsnorm_fn,
    }


def triton_chunk_scan() -> Callable | None:
    """`mamba_chunk_scan_combined`, or None when mamba-ssm's Triton ops cannot be imported."""
    ops = _triton_ops()
    return ops["chunk_scan"] if ops else None


def triton_state_update() -> Callable | None:
    ops = _triton_ops()
    return ops["state_update"] if ops else None


def triton_rmsnorm_fn() -> Callable | None:
    ops = _triton_ops()
    return ops["rmsnorm"] if ops else None
