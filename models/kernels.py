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
import pkgutil
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


def limit_autotune_configs(keep: int = 2) -> int:
    """Keep the `keep` lightest autotune configs of every mamba-ssm and fla (GDN) Triton kernel; returns how many
    were cut.

    Every config computes the same function; autotuning all of them compiles ~200 kernel variants per new
    shape and dtype, minutes on a fresh machine. The GPU tests use this (speed is not their subject), and so
    can a short benchmark that would otherwise spend its time limit compiling (bench/train.py
    --light-autotune, at some cost in speed). The lightest ones: a heavy config can exceed shared memory.
    """
    from importlib.util import find_spec

    modules = []
    if triton_chunk_scan() is not None:
        # through the guarded import: after a failed `import mamba_ssm` elsewhere (a version probe, say) the ops'
        # modules stay importable while the package itself does not
        triton_ops = _import_triton_module("mamba_ssm.ops.triton")
        names = (f"mamba_ssm.ops.triton.{info.name}" for info in pkgutil.iter_modules(triton_ops.__path__))
        modules += [_import_triton_module(name) for name in names]
    if find_spec("fla") is not None:  # fla-core: its GDN op imports the modules of all the kernels it runs
        try:
            importlib.import_module("fla.ops.gated_delta_rule")
        except Exception:  # noqa: BLE001 - no triton or no GPU: nothing of fla's will run, nothing to trim
            pass
        modules += [module for name, module in list(sys.modules.items()) if name.startswith("fla.")]
    return sum(_trim_autotuners(module, keep) for module in modules if module is not None)


def _trim_autotuners(module: types.ModuleType, keep: int) -> int:
    from triton.runtime.autotuner import Autotuner

    cut = 0
    for obj in vars(module).values():
        if isinstance(obj, Autotuner) and len(obj.configs) > keep:
            cut += len(obj.configs) - keep
            obj.configs = sorted(obj.configs, key=_config_weight)[:keep]
    return cut


def _config_weight(config) -> int:
    blocks = 1
    for value in config.kwargs.values():
        blocks *= value if isinstance(value, int) else 1
    return config.num_stages * blocks
