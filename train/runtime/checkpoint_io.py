"""Checkpoints written atomically and read safely.

Writes go to a temporary file in the same folder, fsynced, then renamed over the target (and the folder fsynced),
so a crash mid-write (kill -9, node failure) or a full disk leaves the previous checkpoint intact and loadable. A
failed write raises `CheckpointError` naming the file, the cause and the free space. Temporary files left by a
killed writer are removed by the next write of the same checkpoint.

Reads use `torch.load(weights_only=True)`: tensors, numbers, strings and containers only, so a checkpoint file
cannot run code. An unreadable file (truncated, not a checkpoint) raises `CheckpointError`.

`check_resumable` refuses resumes that cannot work, before anything loads: a DeepSpeed (ZeRO) checkpoint directory
under another strategy or world size, a single-file checkpoint under DeepSpeed (`train.runtime.deepspeed_strategy` runs
it for DeepSpeed, `AtomicCheckpointIO.load_checkpoint` for every other strategy). Single-file checkpoints (DDP,
single device) hold the full state and resume at any world size (the data stream re-splits, data/README.md).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from models.errors import first_line

from .faults import CheckpointError

_TMP = ".{name}.tmp-{pid}"


def _tmp_path(path: Path, pid: int) -> Path:
    return path.with_name(_TMP.format(name=path.name, pid=pid))


def _remove_stale_tmp(path: Path) -> None:
    """Temporary files of `path` written by processes that no longer run (killed mid-write)."""
    pattern = re.compile(re.escape(f".{path.name}.tmp-") + r"(\d+)$")
    for candidate in path.parent.glob(f".{path.name}.tmp-*"):
        match = pattern.match(candidate.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            candidate.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX: the directory entry lives in the folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_failure(path: Path, error: BaseException) -> CheckpointError:
    cause = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**30:.1f} GiB free"
    except OSError:
        free = "free space unknown"
    full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    hint = "free space (or raise the quota) there" if full else "fix the cause"
    previous = f"the previous {path.name} is intact" if path.exists() else f"no earlier {path.name} exists"
    return CheckpointError(
        f"could not write checkpoint {path}: {cause} ({free} on {path.parent}); {previous}; {hint} and rerun the "
        "same command to resume"
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        tmp = _tmp_path(path, os.getpid())
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_tmp(path)
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except (OSError, RuntimeError) as error:  # torch's zip writer reports some I/O errors as RuntimeError
            raise _write_failure(path, error) from error
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(
        self, path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        path = Path(path)
        check_resumable(path, deepspeed=False, world_size=1)
        # Our checkpoints hold tensors, numbers, strings and containers only: nothing in them needs unpickling code.
        weights_only = True if weights_only is None else weights_only
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as error:
            raise CheckpointError(
                f"cannot read checkpoint {path} ({type(error).__name__}: {first_line(error)}); it is damaged or was "
                "not written by this program. Move it away to resume from an earlier one, or to restart the stage"
            ) from error


# ------------------------------------------------------------------------------------------------- resume


def deepspeed_world_size(path: Path) -> int | None:
    """The data-parallel size a DeepSpeed checkpoint directory was written with (its ZeRO optimizer shards, one per
    rank: `<tag>/[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt`); None if it has none (not ZeRO)."""
    tag_file = path / "latest"
    tag = tag_file.read_text().strip() if tag_file.is_file() else "checkpoint"
    ranks = {
        int(m.group(1))
        for f in (path / tag).glob("*zero_pp_rank_*_optim_states.pt")
        if (m := re.search(r"zero_pp_rank_(\d+)_mp_rank_", f.name))
    }
    return len(ranks) or None


def check_resumable(path: str | Path | None, deepspeed: bool, world_size: int, file_ok: bool = False) -> None:
    """Raise CheckpointError (one line) when `path` cannot resume under this strategy and world size.
    `file_ok`: DeepSpeed set to load a consolidated single file (ZeRO-3 with load_full_weights)."""
    if path is None or not Path(path).exists():
        return
    path = Path(path)
    if path.is_dir() and not deepspeed:
        raise CheckpointError(
            f"{path} is a DeepSpeed checkpoint directory but this run does not use DeepSpeed; resume with the "
            "strategy that wrote it, or move the folder away to restart the stage"
        )
    if path.is_file() and deepspeed and not file_ok:
        raise CheckpointError(
            f"{path} is a single-file checkpoint (DDP / single device) but this run uses DeepSpeed, which resumes only "
            "from its own checkpoint directories; resume with the strategy that wrote it, or move the file away to "
            "restart the stage"
        )
    if path.is_dir():
        written = deepspeed_world_size(path)
        if written is not None and written != world_size:
            raise CheckpointError(
                f"{path} is a DeepSpeed ZeRO checkpoint of {written} ranks, but this run has {world_size} "
                f"(trainer.devices x trainer.num_nodes); ZeRO shards optimizer state per rank, so resume with "
                f"{written} ranks, or restart the stage from its student (DeepSpeed's zero_to_fp32.py recovers the "
                "weights)"
            )
