"""GPU tests: keep two light autotune configs per mamba-ssm and fla Triton kernel
(models.kernels.limit_autotune_configs): autotuning every config costs minutes of device time per new shape, and
speed is measured in bench/, not here.
"""

import pytest

from models.kernels import limit_autotune_configs


@pytest.fixture(scope="session", autouse=True)
def _light_autotune():
    limit_autotune_configs(keep=2)
