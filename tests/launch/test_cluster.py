"""trainer.devices / trainer.num_nodes from SLURM and torchrun environments (train/runtime/cluster.py)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.config import ConfigError, compose_config
from train.runtime.cluster import apply_allocation, override_keys

REPO = Path(__file__).resolve().parents[2]


def slurm(nodes: int = 1, per_node: int = 8, **extra: str) -> dict[str, str]:
    """What srun puts in each task's environment for `--nodes=<nodes> --ntasks-per-node=<per_node>`."""
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "zebra_1b",
        "SLURM_NTASKS": str(nodes * per_node),
        "SLURM_NTASKS_PER_NODE": str(per_node),
        "SLURM_NNODES": str(nodes),
        "SLURM_GPUS_ON_NODE": str(per_node),
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
    }
    return {**env, **extra}


@pytest.fixture(scope="module")
def composed() -> dict[str, object]:
    return {preset: compose_config([f"conf={preset}"]) for preset in ("zebra_1b", "tiny")}


def config(composed, preset: str = "zebra_1b", **trainer):
    cfg = copy.deepcopy(composed[preset])
    for key, value in trainer.items():
        cfg.trainer[key] = value
    return cfg


def test_one_node_of_eight_gpus_fills_devices(composed):
    cfg = config(composed)
    assert cfg.trainer.devices == "auto" and cfg.trainer.num_nodes == 1
    alloc = apply_allocation(cfg, slurm(nodes=1))
    assert alloc is not None
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (8, 1)


def test_two_nodes_of_eight_fill_devices_and_nodes(composed):
    cfg = config(composed)
    apply_allocation(cfg, slurm(nodes=2))
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (8, 2)


def test_matching_explicit_values_are_kept(composed):
    cfg = config(composed, devices=8, num_nodes=2)
    apply_allocation(cfg, slurm(nodes=2), explicit={"trainer.devices", "trainer.num_nodes"})
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (8, 2)
    cfg = config(composed, devices=list(range(8)))
    apply_allocation(cfg, slurm(nodes=1))
    assert list(cfg.trainer.devices) == list(range(8))


@pytest.mark.parametrize(
    ("trainer", "explicit", "env", "names"),
    [
        ({"devices": 4}, {"trainer.devices"}, slurm(nodes=1), ["trainer.devices=4", "SLURM_NTASKS_PER_NODE=8"]),
        ({"devices": 4}, set(), slurm(nodes=1), ["trainer.devices=4", "SLURM_NTASKS_PER_NODE=8"]),  # from a preset
        ({"num_nodes": 4}, {"trainer.num_nodes"}, slurm(nodes=2), ["trainer.num_nodes=4", "SLURM_NNODES=2"]),
        # 1 is the default, but given on the command line it is the user's word: it must match too
        ({"num_nodes": 1}, {"trainer.num_nodes"}, slurm(nodes=2), ["trainer.num_nodes=1", "SLURM_NNODES=2"]),
        ({"devices": 1}, {"trainer.devices"}, slurm(nodes=1), ["trainer.devices=1", "SLURM_NTASKS_PER_NODE=8"]),
        ({"devices": [0, 1]}, set(), slurm(nodes=1), ["trainer.devices=[0, 1]", "SLURM_NTASKS_PER_NODE=8"]),
    ],
)
def test_inconsistent_values_fail_in_one_line_naming_key_and_variable(composed, trainer, explicit, env, names):
    cfg = config(composed, **trainer)
    with pytest.raises(ConfigError) as error:
        apply_allocation(cfg, env, explicit=explicit)
    message = str(error.value)
    assert "\n" not in message
    for name in names:
        assert name in message, message


def test_more_tasks_than_gpus_fail(composed):
    with pytest.raises(ConfigError, match="SLURM_GPUS_ON_NODE=4"):
        apply_allocation(config(composed), slurm(per_node=8, SLURM_GPUS_ON_NODE="4"))


def test_ntasks_without_ntasks_per_node_fail(composed):
    env = slurm(nodes=2)
    del env["SLURM_NTASKS_PER_NODE"]
    with pytest.raises(ConfigError, match="--ntasks-per-node"):
        apply_allocation(config(composed), env)


@pytest.mark.parametrize(
    "env",
    [
        {},  # a plain process: laptop, CI
        {"PATH": "/usr/bin", "HOME": "/home/u"},
        slurm(nodes=2, SLURM_JOB_NAME="bash"),  # salloc, then an interactive shell: Lightning's rule, not SLURM
        slurm(nodes=2, SLURM_JOB_NAME="interactive"),
        {k: v for k, v in slurm(nodes=2).items() if k != "SLURM_NTASKS"},  # the batch shell, outside srun
    ],
    ids=["empty", "plain", "interactive-bash", "interactive", "batch-shell"],
)
def test_outside_a_launcher_the_config_is_untouched(composed, env):
    cfg = config(composed, devices=4, num_nodes=3)  # values that would fail under srun
    before = copy.deepcopy(cfg)
    assert apply_allocation(cfg, env, explicit={"trainer.devices"}) is None
    assert cfg == before


def test_cpu_preset_default_devices_follow_the_tasks(composed):
    cfg = config(composed, "tiny")
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 1
    env = slurm(nodes=1, per_node=2)
    del env["SLURM_GPUS_ON_NODE"]  # a CPU partition
    apply_allocation(cfg, env)
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (2, 1)


def test_torchrun_sets_devices_and_nodes_and_wins_over_slurm(composed):
    env = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8", "RANK": "0", "LOCAL_RANK": "0"}
    cfg = config(composed)
    apply_allocation(cfg, env)
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (4, 2)
    cfg = config(composed)
    apply_allocation(cfg, {**slurm(nodes=1), **env})  # torchrun inside a SLURM job: torchrun's layout (as Lightning)
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (4, 2)
    with pytest.raises(ConfigError, match=r"trainer.devices=8 .*LOCAL_WORLD_SIZE=4"):
        apply_allocation(config(composed, devices=8), env)


def test_override_keys():
    assert override_keys(["conf=zebra_1b", "+trainer.devices=4", "~logger", "kd.lr=1e-4"]) == {
        "conf",
        "trainer.devices",
        "logger",
        "kd.lr",
    }


def test_cli_applies_the_slurm_environment_before_anything_loads(tmp_path):
    """`python -m train` under srun: a command-line value against the allocation is one line and exit 2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(slurm(nodes=1, per_node=2, SLURM_GPUS_ON_NODE=""))
    result = subprocess.run(
        [sys.executable, "-m", "train", f"output_dir={tmp_path / 'out'}", "trainer.devices=3"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "trainer.devices=3" in lines[0] and "SLURM_NTASKS_PER_NODE=2" in lines[0], lines[0]
