"""GPU tests: keep two light autotune configs per mamba-ssm Triton kernel.

Every config computes the same function; autotuning them all recompiles ~200 kernel variants per new
shape and dtype, minutes of device time per test. Speed is measured in bench/, not here.
"""

import importlib
import pkgutil

import pytest


@pytest.fixture(scope="session", autouse=True)
def _single_autotune_config():
    try:
        from triton.runtime.autotuner import Autotuner

        from models import kernels

        if kernels.triton_chunk_scan() is None:
            return
        import mamba_ssm.ops.triton as triton_ops
    except ImportError:
        return
    for info in pkgutil.iter_modules(triton_ops.__path__):
        try:
            module = importlib.import_module(f"mamba_ssm.ops.triton.{info.name}")
        except ImportError:
            continue
        for obj in vars(module).values():
            if isinstance(obj, Autotuner) and len(obj.configs) > 2:
                # The lightest two: a heavy config can exceed shared memory for fp32 (the tuner skips those).
                obj.configs = sorted(obj.configs, key=_weight)[:2]


def _weight(config) -> int:
    blocks = 1
    for value in config.kwargs.values():
        blocks *= value if isinstance(value, int) else 1
    return config.num_stages * blocks
