"""LightningDataModule for the ILD and KD stages: packed training streams, a held-out loader, resume.

Usage from a stage:

    dm = DistillDataModule(cfg.data, tokenizer=teacher_tokenizer, phase="ild")
    trainer.fit(module, datamodule=dm, ckpt_path=...)   # later: dm.set_phase("kd")

Progress is counted from the batches the training loop actually receives (each carries its stream
positions, popped in `on_before_batch_transfer`), so prefetched batches never count and a resumed
run continues with exactly the remaining stream. `state_dict()` carries it into Lightning checkpoints.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase

from data.batch import collate_rows
from data.build import PhaseData, build_phases, load_tokenizer
from data.config import DataConfig
from data.order import (
    RowDataset,
    StreamDataset,
    StreamLoader,
    StreamProgress,
    StreamSampler,
    consumed_after,
)
from data.sources import DataSourceError

log = logging.getLogger(__name__)

TRAIN_PHASES = ("ild", "kd")
STATE_VERSION = 1


def worker_init(worker_id: int) -> None:
    """Signals for DataLoader workers. A cluster signals every process of the job (SLURM: SIGUSR1 warnings, SIGTERM at
    the end), and a worker killed by a signal makes PyTorch raise in the main process wherever it is, mid-step, before
    it can finish the step and write its checkpoint (train/runtime/preemption.py). So workers ignore SIGUSR1 and end
    quietly (status 0, which PyTorch does not treat as a failure) on SIGTERM: the step in progress already holds its
    batch, and SIGTERM is also how multiprocessing ends workers at exit, which must not wait."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_quietly)
    if os.environ.get("PL_SEED_WORKERS") == "1":  # what Lightning adds when a loader has no worker_init_fn
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)


def _exit_quietly(signum: int, frame: Any) -> None:
    os._exit(0)


class DistillDataModule(L.LightningDataModule):
    """Train loaders for the "ild" and "kd" phases (disjoint documents) and an eval loader."""

    def __init__(
        self,
        cfg: DataConfig | Mapping[str, Any],
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        phase: str = "kd",
        rank: int | None = None,
        world_size: int | None = None,
        keep_stream_index: bool = False,
    ) -> None:
        """`cfg` may be a plain mapping (an untyped DictConfig); `rank`/`world_size` default to the
        trainer's (or torch.distributed's, or 0/1); `keep_stream_index`: training batches keep their stream
        positions (offline KD reads the cached teacher outputs by them), otherwise they are popped."""
        super().__init__()
        self.cfg = cfg.validate() if isinstance(cfg, DataConfig) else DataConfig.from_dict(cfg)
        self._tokenizer_arg = tokenizer
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.phases: dict[str, PhaseData] = {}
        self.progress = {p: StreamProgress() for p in TRAIN_PHASES}
        self._loaded_state: dict[str, Any] | None = None
        self._rank, self._world_size = rank, world_size
        self.keep_stream_index = keep_stream_index
        self._layout: dict[str, tuple[int, int, int]] = {}  # phase -> (rank, world size, micro batch)
        self.set_phase(phase)

    # ---- data -----------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download, tokenize and pack once per node (later calls hit the datasets cache). The process that did it
        keeps the result: its `setup` would only build the same rows again from the cache."""
        self.tokenizer = load_tokenizer(self.cfg, self._tokenizer_arg)
        self.phases = build_phases(self.cfg, self.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        if not self.phases:
            self.tokenizer = load_tokenizer(self.cfg, self._tokenizer_arg)
            self.phases = build_phases(self.cfg, self.tokenizer)

    def set_phase(self, phase: str) -> None:
        """Which training stream `train_dataloader()` serves: "ild" or "kd"."""
        if phase not in TRAIN_PHASES:
            raise ValueError(f"phase={phase!r} is invalid; allowed: {TRAIN_PHASES}")
        self.phase = phase

    def _dist(self) -> tuple[int, int]:
        if self._rank is not None or self._world_size is not None:
            return self._rank or 0, self._world_size or 1
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _loader(self, dataset: Any, sampler: Any, batch_size: int) -> DataLoader:
        assert self.tokenizer is not None
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)  # never a target: any valid id
        workers = self.cfg.num_workers
        pin = torch.cuda.is_available() if self.cfg.pin_memory is None else self.cfg.pin_memory
        cls = StreamLoader if isinstance(sampler, StreamSampler) else DataLoader
        return cls(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=isinstance(sampler, StreamSampler),
            collate_fn=functools.partial(collate_rows, seq_len=self.cfg.seq_len, pad_id=pad),
            num_workers=workers,
            worker_init_fn=worker_init if workers > 0 else None,
            pin_memory=pin,
            persistent_workers=workers > 0,
        )

    def phase_dataloader(self, phase: str) -> DataLoader:
        """The training stream of `phase`, continuing from its consumed position."""
        self.setup()
        data = self.phases[phase]
        if len(data.rows) == 0:
            total = sum(p.num_docs for p in self.phases.values())
            raise DataSourceError(
                f"data: phase {phase!r} has no documents (ild_fraction={self.cfg.ild_fraction}, "
                f"eval_fraction={self.cfg.eval_fraction}, {total} documents in all); add data or change the fractions"
            )
        self._apply_loaded_state()
        rank, world = self._dist()
        b = self.cfg.micro_batch_size
        if len(data.rows) < b * world:
            log.warning(
                "data %s: %d rows for a global batch of %d: rows repeat within a step",
                phase,
                len(data.rows),
                b * world,
            )
        self._layout[phase] = (rank, world, b)
        sampler = StreamSampler(len(data.rows), self.progress[phase], b, rank, world)
        return self._loader(StreamDataset(data.rows, self.cfg.seed), sampler, b)

    def train_dataloader(self) -> DataLoader:
        return self.phase_dataloader(self.phase)

    def val_dataloader(self) -> DataLoader:
        """Held-out rows in a fixed order, split across ranks (DistributedSampler pads with repeats)."""
        self.setup()
        rows = self.phases["eval"].rows
        if len(rows) == 0:
            raise DataSourceError(f"data: no held-out rows (eval_fraction={self.cfg.eval_fraction})")
        rank, world = self._dist()
        sampler = DistributedSampler(RowDataset(rows), num_replicas=world, rank=rank, shuffle=False)
        return self._loader(RowDataset(rows), sampler, self.cfg.eval_micro_batch_size or self.cfg.micro_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    # ---- progress and resume --------------------------------------------------------------------
    def record_consumed(self, batch: Any) -> Any:
        """Pop `stream_index` from a training batch (unless kept) and advance that phase's progress past it."""
        if isinstance(batch, dict) and "stream_index" in batch:
            first = int((batch["stream_index"] if self.keep_stream_index else batch.pop("stream_index"))[0])
            rank, world, b = self._layout[self.phase]
            progress = self.progress[self.phase]
            progress.consumed = max(progress.consumed, consumed_after(first, rank, world, b))
        return batch

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.record_consumed(batch)

    def state_dict(self) -> dict[str, Any]:
        phases = {}
        for p in TRAIN_PHASES:
            info = {"consumed": self.progress[p].consumed}
            if p in self.phases:
                info |= {"fingerprint": self.phases[p].fingerprint, "num_rows": len(self.phases[p].rows)}
            phases[p] = info
        return {"version": STATE_VERSION, "seed": self.cfg.seed, "phases": phases}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore progress; checked against the data once it is built (refuses different data)."""
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state_dict.get('version')!r} is not {STATE_VERSION}")
        self._loaded_state = state_dict
        if self.phases:
            self._apply_loaded_state()

    def _apply_loaded_state(self) -> None:
        state, self._loaded_state = self._loaded_state, None
        if state is None:
            return
        for p, info in state["phases"].items():
            ours = self.phases.get(p)
            if (
                info["consumed"]
                and ours is not None
                and "fingerprint" in info
                and (info["fingerprint"] != ours.fingerprint or state["seed"] != self.cfg.seed)
            ):
                raise DataSourceError(
                    f"data: cannot resume phase {p!r}: the checkpoint consumed {info['consumed']} rows "
                    f"of data {info['fingerprint']} ({info['num_rows']} rows, seed {state['seed']}), "
                    f"but this config gives data {ours.fingerprint} ({len(ours.rows)} rows, "
                    f"seed {self.cfg.seed}). Sources, tokenizer, seed, seq_len, split fractions or packing "
                    "options changed; restore them, or start the stage without the checkpoint's data state"
                )
            self.progress[p].consumed = int(info["consumed"])
