"""`trainer.devices` and `trainer.num_nodes` from the launcher's environment (SLURM's srun, torchrun).

One command line then fits any allocation: `sbatch --nodes=2 launch/zebra_multinode.sbatch conf=zebra_1b` needs no
`trainer.num_nodes=2`. Lightning checks the same thing much later (SLURMEnvironment compares devices with
SLURM_NTASKS_PER_NODE and num_nodes with SLURM_NNODES; TorchElasticEnvironment wants devices x num_nodes ==
WORLD_SIZE), with a traceback, after the teacher has loaded. Here a mismatch is one line before anything loads.

Rule: a value left at its default (devices `auto`, -1 or 1; num_nodes 1) follows the allocation. Any other value,
and any value given on the command line, must match it: `trainer.devices=4` in an 8-task-per-node job is a
ConfigError naming the key and the variable. One process per GPU: each task drives `cuda:<local rank>`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from train.config import ConfigError

log = logging.getLogger(__name__)

INTERACTIVE_JOB_NAMES = ("bash", "interactive")  # Lightning's rule: `srun --job-name=interactive` opts out of SLURM
DEFAULT_DEVICES = ("auto", -1, 1)
DEFAULT_NUM_NODES = 1


@dataclass(frozen=True)
class Allocation:
    """Processes per node and nodes, and the variables they came from (named in error messages)."""

    devices: int
    num_nodes: int
    devices_var: str  # e.g. "SLURM_NTASKS_PER_NODE=8 (--ntasks-per-node)"
    nodes_var: str  # e.g. "SLURM_NNODES=2 (--nodes)"
    gpus_per_node: int | None = None  # SLURM_GPUS_ON_NODE, when SLURM says


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer; launch with one task per GPU") from None


def slurm_allocation(env: Mapping[str, str]) -> Allocation | None:
    """The allocation of an srun step, or None outside SLURM, in an interactive allocation (`salloc` then `bash`)
    or in a batch script outside srun (no SLURM_NTASKS: Lightning does not treat that as SLURM either)."""
    if "SLURM_JOB_ID" not in env or "SLURM_NTASKS" not in env:
        return None
    if env.get("SLURM_JOB_NAME") in INTERACTIVE_JOB_NAMES:
        return None
    ntasks = _int(env, "SLURM_NTASKS")
    if "SLURM_NTASKS_PER_NODE" in env:
        per_node = _int(env, "SLURM_NTASKS_PER_NODE")
    elif ntasks == 1:
        per_node = 1
    else:  # Lightning refuses --ntasks without --ntasks-per-node (it cannot place ranks on nodes)
        raise ConfigError(
            f"SLURM_NTASKS={ntasks} without SLURM_NTASKS_PER_NODE: launch with --ntasks-per-node=<GPUs per node> "
            "instead of --ntasks (launch/zebra_1node.sbatch does)"
        )
    nodes = _int(env, "SLURM_NNODES") if "SLURM_NNODES" in env else 1
    gpus = _int(env, "SLURM_GPUS_ON_NODE") if env.get("SLURM_GPUS_ON_NODE") else None
    return Allocation(
        per_node,
        nodes,
        f"SLURM_NTASKS_PER_NODE={per_node} (--ntasks-per-node)",
        f"SLURM_NNODES={nodes} (--nodes)",
        gpus,
    )


def torchrun_allocation(env: Mapping[str, str]) -> Allocation | None:
    """The allocation of a torchrun launch (TORCHELASTIC_RUN_ID set, as torch's is_torchelastic_launched checks)."""
    if "TORCHELASTIC_RUN_ID" not in env or "LOCAL_WORLD_SIZE" not in env or "WORLD_SIZE" not in env:
        return None
    per_node, world = _int(env, "LOCAL_WORLD_SIZE"), _int(env, "WORLD_SIZE")
    if per_node < 1 or world % per_node:
        raise ConfigError(
            f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={per_node}: give every node the same "
            "--nproc_per_node"
        )
    nodes = world // per_node
    return Allocation(
        per_node, nodes, f"LOCAL_WORLD_SIZE={per_node} (--nproc_per_node)", f"WORLD_SIZE/LOCAL_WORLD_SIZE={nodes}"
    )


def allocation(env: Mapping[str, str]) -> Allocation | None:
    """torchrun first, as in Lightning (it can run inside a SLURM job), then SLURM; None for a plain process."""
    return torchrun_allocation(env) or slurm_allocation(env)


def _count(devices: Any) -> int | None:
    """How many devices a value asks for; None for the placeholders `auto` / -1 (all visible)."""
    if isinstance(devices, str):
        return None
    if isinstance(devices, int):
        return None if devices == -1 else devices
    return len(devices)  # a list of device ids (a ListConfig from Hydra)


def world_size(cfg: Any) -> int:
    """Training processes of a run from its config (TrainConfig): devices per node x nodes; `auto` / -1 count every
    visible GPU, or one process on the CPU."""
    import torch  # here: the launchers import this module and need no torch

    per_node = _count(cfg.trainer.devices)
    if per_node is None:
        per_node = max(torch.cuda.device_count(), 1) if cfg.trainer.accelerator != "cpu" else 1
    return per_node * cfg.trainer.num_nodes


def resolve_devices(
    devices: Any, num_nodes: int, alloc: Allocation, accelerator: str = "gpu", explicit: Iterable[str] = ()
) -> tuple[Any, int]:
    """(devices, num_nodes) that agree with `alloc`; `explicit`: the keys given on the command line."""
    explicit = set(explicit)
    if accelerator != "cpu" and alloc.gpus_per_node is not None and alloc.devices > alloc.gpus_per_node:
        raise ConfigError(
            f"{alloc.devices_var} tasks but SLURM_GPUS_ON_NODE={alloc.gpus_per_node} GPUs per node: launch one task "
            "per GPU (--ntasks-per-node equal to --gpus-per-node)"
        )
    if "trainer.devices" in explicit or devices not in DEFAULT_DEVICES:
        if _count(devices) not in (None, alloc.devices):
            raise ConfigError(
                f"trainer.devices={devices!r} does not match the allocation's {alloc.devices_var} (one process per "
                f"device); leave trainer.devices unset or set it to {alloc.devices}"
            )
        # `auto` / -1 given explicitly: Lightning would count the visible GPUs; the task count is what runs
        devices = devices if _count(devices) is not None else alloc.devices
    else:
        devices = alloc.devices
    if "trainer.num_nodes" in explicit or num_nodes != DEFAULT_NUM_NODES:
        if num_nodes != alloc.num_nodes:
            raise ConfigError(
                f"trainer.num_nodes={num_nodes!r} does not match the allocation's {alloc.nodes_var}; leave "
                f"trainer.num_nodes unset or set it to {alloc.num_nodes}"
            )
    return devices, alloc.num_nodes


def apply_allocation(cfg: Any, env: Mapping[str, str], explicit: Iterable[str] = ()) -> Allocation | None:
    """Set `cfg.trainer.devices` / `cfg.trainer.num_nodes` from the launcher's environment (in place); return the
    allocation, or None (config untouched) outside a launcher. Raises ConfigError on a mismatch."""
    alloc = allocation(env)
    if alloc is None:
        return None
    trainer = cfg.trainer
    devices, nodes = resolve_devices(trainer.devices, trainer.num_nodes, alloc, str(trainer.accelerator), explicit)
    if (devices, nodes) != (trainer.devices, trainer.num_nodes):
        log.info("%s, %s: trainer.devices=%s trainer.num_nodes=%d", alloc.devices_var, alloc.nodes_var, devices, nodes)
    trainer.devices, trainer.num_nodes = devices, nodes
    return alloc


def override_keys(overrides: Iterable[str]) -> set[str]:
    """The keys of Hydra command-line overrides: `+trainer.devices=4` -> `trainer.devices`."""
    keys = set()
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        keys.add(key)
    return keys
