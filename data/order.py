"""Sample order: one global stream of packed rows, a pure function of the seed.

The stream is the concatenation of epoch permutations: position g is row
`permutation(seed, epoch = g // N)[g % N]`. It does not depend on the world size. Training consumes
it in global batches of G = micro_batch_size * world_size positions; rank r takes the contiguous
slice [C + r*B, C + (r+1)*B) of the global batch starting at C (samples consumed so far). Hence:

- what a rank sees is a pure function of (seed, consumed, rank, world size, micro batch size);
- resuming at `consumed` continues with exactly the remaining stream;
- within an epoch no two ranks (and no two steps) see the same row;
- changing the world size (or micro batch size) between runs is handled: the new ranks split the
  remaining stream, nothing is repeated or skipped. Only a global batch that straddles an epoch
  boundary may hold one row twice (once from each epoch).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
from torch.utils.data import DataLoader, Dataset, DistributedSampler

_SALT = 5  # separates this random stream from the split and mixture streams (data/mixture.py)


def epoch_permutation(seed: int, epoch: int, num_rows: int) -> np.ndarray:
    """The order of the rows in one epoch of the stream."""
    return np.random.default_rng([seed, _SALT, epoch]).permutation(num_rows)


def stream_rows(
    seed: int, num_rows: int, positions: np.ndarray, cache: dict[int, np.ndarray] | None = None
) -> np.ndarray:
    """Rows at stream positions; `cache` keeps epoch permutations between calls."""
    positions = np.asarray(positions, np.int64)
    cache = {} if cache is None else cache
    out = np.empty_like(positions)
    for epoch in np.unique(positions // num_rows).tolist():
        if epoch not in cache:
            if len(cache) >= 2:  # a batch spans at most two epochs
                cache.pop(min(cache))
            cache[epoch] = epoch_permutation(seed, epoch, num_rows)
        sel = positions // num_rows == epoch
        out[sel] = cache[epoch][positions[sel] % num_rows]
    return out


def rank_positions(consumed: int, rank: int, world_size: int, micro_batch_size: int, num_batches: int) -> np.ndarray:
    """(num_batches, micro_batch_size) stream positions of this rank's next micro-batches."""
    g = micro_batch_size * world_size
    step = consumed + g * np.arange(num_batches, dtype=np.int64)[:, None]
    return step + rank * micro_batch_size + np.arange(micro_batch_size, dtype=np.int64)[None, :]


def consumed_after(first_position: int, rank: int, world_size: int, micro_batch_size: int) -> int:
    """Samples consumed once the global batch containing this rank's micro-batch is done."""
    return first_position - rank * micro_batch_size + micro_batch_size * world_size


@dataclass
class StreamProgress:
    """Samples of the stream consumed by training so far (shared by the sampler and the datamodule)."""

    consumed: int = 0


class StreamSampler(DistributedSampler):
    """Yields this rank's stream positions, starting wherever `progress.consumed` stands.

    A `DistributedSampler` subclass so that Lightning keeps it rather than injecting its own. One
    pass yields `len(self) // micro_batch_size` micro-batches (about one data epoch); each new pass
    re-reads `progress`, which the consumer advances only for batches it actually trained on, so
    batches prefetched but never used are not lost.
    """

    def __init__(
        self,
        num_rows: int,
        progress: StreamProgress,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        # No super().__init__: it wants a dataset and an initialized process group; set what readers use.
        self.num_replicas, self.rank, self.epoch, self.shuffle, self.drop_last = (
            world_size,
            rank,
            0,
            False,
            True,
        )
        self.num_rows, self.progress, self.micro_batch_size = num_rows, progress, micro_batch_size
        self.batches_per_pass = max(1, num_rows // (micro_batch_size * world_size))
        self.num_samples = self.total_size = self.batches_per_pass * micro_batch_size

    def __iter__(self) -> Iterator[int]:
        pos = rank_positions(
            self.progress.consumed, self.rank, self.num_replicas, self.micro_batch_size, self.batches_per_pass
        )
        return iter(pos.reshape(-1).tolist())

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the position in the stream, not Lightning's epoch counter, decides the order."""


class StreamDataset(Dataset):
    """Packed rows addressed by stream position; each item carries its `stream_index`."""

    def __init__(self, rows: datasets.Dataset, seed: int) -> None:
        self.rows = rows.with_format("numpy")
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, positions: list[int]) -> list[dict[str, Any]]:
        rows = stream_rows(self.seed, len(self.rows), np.asarray(positions), self._perms)
        got = self.rows[rows.tolist()]
        return [{**{k: v[i] for k, v in got.items()}, "stream_index": p} for i, p in enumerate(positions)]

    def __getitem__(self, position: int) -> dict[str, Any]:
        return self.__getitems__([position])[0]


class RowDataset(Dataset):
    """Packed rows in stored order (evaluation)."""

    def __init__(self, rows: datasets.Dataset) -> None:
        self.rows = rows.with_format("numpy")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        got = self.rows[list(indices)]
        return [{k: v[i] for k, v in got.items()} for i in range(len(indices))]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]


class StreamLoader(DataLoader):
    """A DataLoader that tells Lightning it resumes mid-epoch (Lightning checks for these two methods).

    The position itself lives in the datamodule's state (checked against the data there), not here.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass
