"""`teacher.shard` on 2 CPU processes (gloo): the frozen teacher partitioned by DeepSpeed ZeRO-3 against the same
teacher replicated, in one KD step and one ILD step of the real modules under Lightning's ZeRO-3 strategy.

- Memory: each rank holds ~1/2 of the teacher's parameter bytes, counted from what DeepSpeed actually keeps (each
  partitioned parameter's local slice `ds_tensor`; the parameter itself is an empty placeholder between uses). The
  only excess is partition padding: a parameter of n elements keeps ceil(n / 2) per rank, so the sum is checked
  exactly against sum(ceil(n / 2)) and the ratio to the whole teacher within 1 % of 1/2.
- Numerics: the KD loss on each rank and the student's gradients (written into the weights by the optimizer, as
  tests/train/test_deepspeed_zero3_cpu.py does) equal the replicated teacher's run at 1e-6, and the single-process
  full-batch reference at 1e-5. KD runs with a tied teacher (its lm_head is the embedding, gathered for the loss) and
  an untied one (an lm_head no teacher forward ever gathers).

The ZeRO-3 part runs this file as a module in a subprocess: Lightning's launcher re-executes sys.argv.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from models.sizes import TINY_LLAMA
from train.config import ConfigError, calibration_rows, compose_config, validate_config
from train.runtime.sharded_teacher import held_bytes

from .test_deepspeed_zero3_cpu import (
    KD_LOSS,
    OPTIM,
    ROWS,
    GradILD,
    GradKD,
    leave_zero3_process,
    reference_step,
    rows,
    run_zero3_processes,
    student,
    zero3_cpu_trainer,
)

REPO = Path(__file__).resolve().parents[2]
RUNS = ("kd_replicated", "kd_sharded", "kd_sharded_untied", "ild_replicated", "ild_sharded")


def teacher(tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(1)
    config = LlamaConfig(**{**TINY_LLAMA, "vocab_size": 97, "num_hidden_layers": 2, "tie_word_embeddings": tied})
    return LlamaForCausalLM(config).eval()


def module(name: str) -> GradKD | GradILD:
    """A fresh module of run `name`, identical on every call; the shard flag is what the stages set."""
    if name.startswith("kd"):  # kd_sharded_untied's single-process twin: kd_replicated_untied
        made = GradKD(student(), teacher(tied="untied" not in name), OPTIM, KD_LOSS)
    else:
        made = GradILD({"assigned": student()}, teacher(), OPTIM)
    made.shard_teacher = "sharded" in name
    return made


class Record(L.Callback):
    """Per rank: the step's loss, and after it the teacher bytes held and whether every partitioned parameter is
    back to its empty placeholder (the gathered whole freed)."""

    def __init__(self):
        self.out: dict = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        t = pl_module.teacher
        self.out["loss"] = float(outputs["loss"])
        self.out["held_bytes"] = held_bytes(t)
        self.out["partitioned"] = sum(hasattr(p, "ds_id") for p in t.parameters())
        self.out["released"] = all(p.numel() == 0 for p in t.parameters() if hasattr(p, "ds_id"))
        self.out["engine"] = pl_module.teacher_engine is not None  # the passes went through the teacher's engine


def zero3_steps(out: Path) -> None:
    """One step of each run under ZeRO-3 on 2 CPU processes; each rank writes its record, rank 0 the gradients."""
    import deepspeed

    for name in RUNS:
        made, record = module(name), Record()
        # Partition everything (the sharded teacher's config inherits this): no small parameter stays replicated.
        trainer = zero3_cpu_trainer(callbacks=[record])
        trainer.fit(made, torch.utils.data.DataLoader(rows(), batch_size=ROWS // 2))
        (out / f"{name}.rank{trainer.global_rank}.json").write_text(json.dumps(record.out))
        live = made.student if name.startswith("kd") else made.students["assigned"]
        with deepspeed.zero.GatheredParameters(list(live.parameters())):  # whole on every rank (a collective)
            grads = {k: p.detach().clone() for k, p in live.named_parameters() if p.requires_grad}
        if trainer.is_global_zero:
            torch.save(grads, out / f"{name}.pt")


@pytest.fixture(scope="module")
def zero3_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded_teacher")
    run_zero3_processes("tests.train.test_sharded_teacher_cpu", out, f"{len(RUNS)} ZeRO-3 steps", timeout=600)
    return out


def _records(out: Path, name: str) -> list[dict]:
    return [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(2)]


def test_sharded_teacher_holds_half_the_bytes_per_rank(zero3_out):
    for name in ("kd_sharded", "kd_sharded_untied", "ild_sharded"):
        whole = teacher(tied="untied" not in name)
        params = list(whole.parameters())  # a tied lm_head once
        full = sum(p.numel() * p.element_size() for p in params)
        padded = sum(math.ceil(p.numel() / 2) * p.element_size() for p in params)
        for rank, rec in enumerate(_records(zero3_out, name)):
            print(f"{name} rank {rank}: {rec['held_bytes']} of {full} teacher bytes ({rec['held_bytes'] / full:.4f})")
            assert rec["engine"] and rec["partitioned"] == len(params), f"{name}: the teacher is not partitioned"
            assert rec["released"], f"{name}: a gathered teacher parameter was not freed after the step"
            assert rec["held_bytes"] == padded
            assert abs(rec["held_bytes"] / full - 0.5) <= 0.01
    for rec in _records(zero3_out, "kd_replicated"):  # the baseline holds all of it
        assert rec["held_bytes"] == sum(p.numel() * p.element_size() for p in teacher().parameters())


def _reference(name: str) -> dict[str, torch.Tensor]:
    """The gradients of run `name`'s step on one process, whole batch, replicated teacher."""
    ref = module(name.replace("sharded", "replicated"))
    reference_step(ref)  # the optimizer writes the gradients into the weights
    live = ref.student if name.startswith("kd") else ref.students["assigned"]
    return {k: p.detach() for k, p in live.named_parameters() if p.requires_grad}


def _max_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys()
    return max(((got[k] - w).norm() / w.norm()).item() for k, w in want.items())


@pytest.mark.parametrize("stage", ["kd", "ild"])
def test_sharded_teacher_step_equals_the_replicated_one(zero3_out, stage):
    sharded, replicated = f"{stage}_sharded", f"{stage}_replicated"
    for rank, (a, b) in enumerate(zip(_records(zero3_out, sharded), _records(zero3_out, replicated), strict=True)):
        print(f"{stage} rank {rank}: loss {a['loss']:.8f} sharded vs {b['loss']:.8f} replicated")
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(b["loss"]), (stage, rank)
    grads = torch.load(zero3_out / f"{sharded}.pt")
    err = _max_error(grads, torch.load(zero3_out / f"{replicated}.pt"))
    print(f"{stage}: student gradients, sharded vs replicated teacher: max relative error {err:.1e}")
    assert err <= 1e-6
    err = _max_error(grads, _reference(sharded))
    print(f"{stage}: student gradients, sharded vs single process: max relative error {err:.1e}")
    assert err <= 1e-5


def test_untied_sharded_teacher_step_equals_the_single_process_one(zero3_out):
    """An lm_head that is not the embedding: only the KD loss's gather ever makes it whole."""
    err = _max_error(torch.load(zero3_out / "kd_sharded_untied.pt"), _reference("kd_sharded_untied"))
    print(f"kd, untied teacher: student gradients, sharded vs single process: max relative error {err:.1e}")
    assert err <= 1e-5


def test_sharded_teacher_loss_is_the_single_process_loss(zero3_out):
    """The mean of the ranks' KD losses is the whole batch's (equal tokens per rank), computed on one process."""
    for name in ("kd_sharded", "kd_sharded_untied"):
        ref = module(name.replace("sharded", "replicated"))
        want = float(ref._loss(torch.utils.data.default_collate(rows())).loss)
        got = sum(r["loss"] for r in _records(zero3_out, name)) / 2
        assert abs(got - want) <= 1e-5 * abs(want), (name, got, want)


@pytest.mark.parametrize("strategy", ["ddp", "auto", "deepspeed_zero2"])
def test_shard_needs_zero3(strategy):
    with pytest.raises(ConfigError) as error:
        validate_config(compose_config(["teacher.shard=true", f"strategy={strategy}"]))
    message = str(error.value)
    assert "\n" not in message and message.startswith("teacher.shard=True is invalid") and strategy in message


def test_shard_with_zero3_validates():
    cfg = validate_config(compose_config(["teacher.shard=true", "strategy=deepspeed_zero3_offload_optimizer"]))
    assert cfg.teacher.shard
    # The init stage's calibration would need the whole teacher on one device: off by default under shard.
    assert calibration_rows(cfg) == 0 and calibration_rows(validate_config(compose_config([]))) == 8
    for other in ("student.mixer_init=random", "data.ild_fraction=0"):  # nothing to fit / no ILD text to fit on
        assert calibration_rows(validate_config(compose_config([other]))) == 0


if __name__ == "__main__":
    zero3_steps(Path(sys.argv[1]))
    leave_zero3_process()
