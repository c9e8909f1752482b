"""The datamodule inside a real Lightning Trainer: stop, checkpoint, resume gives the remaining batches."""

from __future__ import annotations

import collections
import gzip
import json

import lightning as L
import numpy as np
import pytest
import torch

from data.config import DataConfig, SourceConfig
from data.corpus import tiny_corpus_path, tiny_tokenizer_path
from data.datamodule import DistillDataModule


class Recorder(L.LightningModule):
    """Records what training_step receives; a trivial loss keeps the optimizer busy."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []
        self.keys: set[str] = set()

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())
        self.keys |= set(batch)
        return (self.w - batch["input_ids"].float().mean()).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val_tokens", batch["attention_mask"].sum().float())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class SavingRecorder(Recorder):
    """For spawned ranks: writes what each rank saw, and a checkpoint, before the processes exit."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out

    def on_train_end(self) -> None:
        torch.save(self.seen, f"{self.out}/rank{self.global_rank}.pt")
        self.trainer.save_checkpoint(f"{self.out}/w2.ckpt")  # collective: every rank calls it


def _dm(cache: str, phase: str = "ild", num_workers: int = 0) -> DistillDataModule:
    cfg = DataConfig(
        sources=[SourceConfig(str(tiny_corpus_path()), max_samples=600)],
        seq_len=128,
        micro_batch_size=4,
        num_workers=num_workers,
        cache_dir=cache,
        tokenizer=str(tiny_tokenizer_path()),
        eval_fraction=0.05,
    )
    return DistillDataModule(cfg, phase=phase)


def _trainer(max_steps: int, **kw) -> L.Trainer:
    args = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    return L.Trainer(max_steps=max_steps, **(args | kw))


@pytest.mark.parametrize("workers", [0, 2])  # 2: worker prefetch must not count as consumed
def test_lightning_resume_continues_the_stream(shared_cache, tmp_path, workers):
    k, m = 13, 10  # ild: 71 rows, 17 batches per pass: resume mid-pass, then cross into the next one
    full = Recorder()
    _trainer(k + m).fit(full, datamodule=_dm(shared_cache, num_workers=workers))
    assert full.keys == {"input_ids", "position_ids", "labels", "attention_mask"}  # stream_index popped

    first, dm1 = Recorder(), _dm(shared_cache, num_workers=workers)
    trainer = _trainer(k)
    trainer.fit(first, datamodule=dm1)
    trainer.save_checkpoint(tmp_path / "k.ckpt")
    assert dm1.state_dict()["phases"]["ild"]["consumed"] == k * 4
    ckpt = torch.load(tmp_path / "k.ckpt", weights_only=False)
    assert ckpt["DistillDataModule"]["phases"]["ild"]["consumed"] == k * 4

    second = Recorder()
    _trainer(k + m).fit(second, datamodule=_dm(shared_cache, num_workers=workers), ckpt_path=tmp_path / "k.ckpt")
    assert len(second.seen) == m
    for a, b in zip(first.seen + second.seen, full.seen, strict=True):
        assert torch.equal(a, b)
    assert len(dm1.phases["ild"].rows) < (k + m) * 4 * 1.5  # several passes really happened


def test_validation_and_phases(shared_cache):
    dm = _dm(shared_cache)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    out = trainer.validate(Recorder(), datamodule=dm)
    eval_tokens = sum(len(r) for r in dm.phases["eval"].rows["input_ids"])
    batches = -(-len(dm.phases["eval"].rows) // 4)
    assert out[0]["val_tokens"] == pytest.approx(eval_tokens / batches, rel=0.3)
    # ild, kd and eval hold different documents (the synthetic corpus repeats some short facts verbatim)
    texts = [json.loads(line)["text"] for line in gzip.open(tiny_corpus_path(), "rt")][:600]
    tok = dm.tokenizer
    repeated = {
        np.array(
            [tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id], np.int32
        ).tobytes()
        for t, n in collections.Counter(texts).items()
        if n > 1
    }
    docs = {}
    for phase, data in dm.phases.items():
        rows = data.rows.with_format("numpy")
        split = [d for r in rows for d in np.split(r["input_ids"], np.cumsum(r["doc_lens"])[:-1])]
        docs[phase] = {d.astype(np.int32).tobytes() for d in split} - repeated
    assert not docs["ild"] & docs["kd"] and not docs["eval"] & docs["kd"] and not docs["eval"] & docs["ild"]
    ild_tokens, kd_tokens = dm.phases["ild"].num_tokens, dm.phases["kd"].num_tokens
    assert 0.15 < ild_tokens / (ild_tokens + kd_tokens) < 0.25
    dm.set_phase("kd")
    assert len(dm.train_dataloader()) == len(dm.phases["kd"].rows) // 4
    with pytest.raises(ValueError, match=r"phase='dpo' is invalid; allowed: \('ild', 'kd'\)"):
        dm.set_phase("dpo")


def test_two_process_ddp_keeps_ranks_disjoint_then_resumes_on_one(shared_cache, tmp_path):
    """Real DDP (2 CPU processes, gloo): Lightning keeps our sampler, ranks see disjoint rows, and the
    checkpoint resumes on one process with exactly the rest of the stream (world size 2 -> 1)."""
    k, m = 5, 6
    trainer = _trainer(k, devices=2, strategy="ddp_spawn")
    trainer.fit(SavingRecorder(str(tmp_path)), datamodule=_dm(shared_cache))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    rows = [{bytes(row.numpy()) for batch in seen for row in batch} for seen in ranks]
    assert len(rows[0]) == len(rows[1]) == k * 4 and not rows[0] & rows[1]

    resumed = Recorder()
    _trainer(k + m).fit(resumed, datamodule=_dm(shared_cache), ckpt_path=tmp_path / "w2.ckpt")
    reference = Recorder()
    _trainer(2 * k + m).fit(reference, datamodule=_dm(shared_cache))
    stream = [b for step in zip(*ranks, strict=True) for b in step] + resumed.seen
    assert len(stream) == len(reference.seen) == 2 * k + m
    for a, b in zip(stream, reference.seen, strict=True):
        assert torch.equal(a, b)
