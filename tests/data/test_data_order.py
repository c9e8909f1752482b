"""Issue point 3: the order is a pure function of (seed, consumed, rank, world size); resume continues it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.config import DataConfig, SourceConfig
from data.corpus import tiny_corpus_path, tiny_tokenizer_path
from data.datamodule import DistillDataModule
from data.order import StreamSampler, rank_positions, stream_rows

B = 8  # micro batch size


def _cfg(shared_cache: str, **kw) -> DataConfig:
    return DataConfig(
        sources=[SourceConfig(str(tiny_corpus_path()), max_samples=600)],
        seq_len=128,
        micro_batch_size=B,
        num_workers=0,
        cache_dir=shared_cache,
        tokenizer=str(tiny_tokenizer_path()),
        **kw,
    )


@pytest.fixture(scope="module")
def built(shared_cache):
    dm = DistillDataModule(_cfg(shared_cache))
    dm.setup()
    return dm


def _dm(built, rank=0, world_size=1, num_workers=0, **kw) -> DistillDataModule:
    """A fresh datamodule (fresh progress) over the already built rows."""
    cfg = _cfg(built.cfg.cache_dir, **kw)
    cfg.num_workers = num_workers
    dm = DistillDataModule(cfg, rank=rank, world_size=world_size)
    if not kw:
        dm.phases, dm.tokenizer = built.phases, built.tokenizer
    return dm


def _take(dm: DistillDataModule, n: int) -> list[dict[str, torch.Tensor]]:
    """Consume n batches the way Lightning does: one loader, a new pass (iter) whenever one ends."""
    loader, out, it = dm.train_dataloader(), [], None
    while len(out) < n:
        if it is None:
            it = iter(loader)
        try:
            batch = next(it)
        except StopIteration:
            it = None
            continue
        out.append({k: v.clone() for k, v in batch.items()})
        dm.record_consumed(batch)
        assert "stream_index" not in batch  # popped: models never see it
    return out


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in ("stream_index", "input_ids", "position_ids", "labels"):
            assert torch.equal(x[key], y[key]), key


def test_stream_is_a_pure_function_of_position():
    rows_a = stream_rows(7, 10, np.arange(30))
    assert sorted(rows_a[:10]) == list(range(10)) and sorted(rows_a[10:20]) == list(range(10))
    assert not np.array_equal(rows_a[:10], rows_a[10:20])  # each epoch reshuffled
    np.testing.assert_array_equal(rows_a, stream_rows(7, 10, np.arange(30)))
    np.testing.assert_array_equal(rows_a[13:17], stream_rows(7, 10, np.arange(13, 17)))
    assert not np.array_equal(rows_a, stream_rows(8, 10, np.arange(30)))
    # rank r of W takes the r-th contiguous slice of every global batch
    assert rank_positions(100, 1, 2, 3, 2).tolist() == [[103, 104, 105], [109, 110, 111]]
    two = np.sort(np.concatenate([rank_positions(12, r, 2, 3, 4).ravel() for r in range(2)]))
    assert two.tolist() == list(range(12, 12 + 24))  # together the ranks take the stream in order


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 0), (2, 0), (2, 2)])
def test_resume_gives_the_remaining_batches(built, world_size, num_workers):
    k, m = 7, 40  # crosses several passes (len(dataloader)) and a data epoch
    for rank in range(world_size):
        full = _take(_dm(built, rank, world_size, num_workers), k + m)
        first = _dm(built, rank, world_size, num_workers)
        head = _take(first, k)
        state = first.state_dict()
        assert state["phases"]["kd"]["consumed"] == k * B * world_size
        second = _dm(built, rank, world_size, num_workers)
        second.load_state_dict(state)
        _same(head + _take(second, m), full)
    assert len(built.phases["kd"].rows) < (k + m) * B * world_size  # the runs did wrap around an epoch


def test_ranks_see_disjoint_rows_within_an_epoch(built):
    n = len(built.phases["kd"].rows)
    steps = n // (2 * B)
    seen = [_take(_dm(built, r, 2), steps) for r in range(2)]
    rows = [stream_rows(built.cfg.seed, n, torch.cat([b["stream_index"] for b in s]).numpy()) for s in seen]
    assert len(set(rows[0])) == len(rows[0]) == steps * B  # no repeats on a rank
    assert not set(rows[0]) & set(rows[1])  # none shared between ranks
    contents = [{bytes(r.numpy()) for b in s for r in b["input_ids"]} for s in seen]
    assert not contents[0] & contents[1]


def test_world_size_change_continues_the_same_stream(built):
    k, m = 5, 12
    ranks = [_dm(built, r, 2) for r in range(2)]
    head = [_take(dm, k) for dm in ranks]
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict()
    single = _dm(built, 0, 1)
    single.load_state_dict(state)
    tail = _take(single, m)
    # stream order: step s of W=2 is rank 0's micro-batch then rank 1's
    resumed = [h for s in range(k) for h in (head[0][s], head[1][s])] + tail
    reference = _take(_dm(built, 0, 1), 2 * k + m)
    _same(resumed, reference)


def test_resume_with_different_data_is_refused(built):
    first = _dm(built)
    _take(first, 3)
    changed = _dm(built, seed=99)
    changed.load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match=r"cannot resume phase 'kd'.*consumed 24 rows.*seed 1234.*seed 99"):
        changed.train_dataloader()


def test_sampler_is_distributed_so_lightning_keeps_it(built):
    dl = _dm(built, 1, 4).train_dataloader()
    assert isinstance(dl.sampler, torch.utils.data.DistributedSampler)
    assert dl.sampler.num_replicas == 4 and dl.sampler.rank == 1 and isinstance(dl.sampler, StreamSampler)
    assert len(dl) == len(built.phases["kd"].rows) // (4 * B)
    assert dl.pin_memory == torch.cuda.is_available()
