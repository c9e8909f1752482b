"""ZeRO-3 on 2 CPU processes against plain training on one: one ILD and one KD step of the real modules.

Each rank gets half of a 4-row batch (Lightning's distributed sampler); the reference takes all 4 rows in one
process. The optimizer step writes each trained weight's gradient into it, so the weights consolidated from the
ZeRO checkpoint (as the pipeline does) are the gradients, compared tensor by tensor at 1e-5 (SGD or AdamW would
bury small gradients under fp32 rounding of the weights, or reduce them to their signs). Every row has the same
documents and no padding, so both ranks average over as many tokens and the mean of the ranks' losses is the loss
of the whole batch. Every parameter is partitioned (no persistence threshold), the student has both mixers, and KD
runs with tied and with separate embeddings (the KD loss reads the lm_head weight outside any module forward) and
with activation checkpointing (zebra_8b's setting: each layer's parameters gathered again for the recompute).

The ZeRO-3 part runs this file as a module in a subprocess: Lightning's launcher re-executes sys.argv.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from models import HybridForCausalLM
from models.sizes import TINY_LLAMA
from train.losses import KDLossConfig
from train.stages.ild import ILDModule
from train.stages.kd import KDModule

from ..models.tiny import tiny_model

REPO = Path(__file__).resolve().parents[2]
ROWS, DOC_LENS = 4, (12, 20)  # each row: two packed documents, no padding
OPTIM = {"lr": 1.0, "weight_decay": 0.0, "warmup_steps": 0, "max_steps": 1, "min_lr_ratio": 1.0}
KD_LOSS = KDLossConfig(divergence="forward_kl", ce_weight=0.5, chunk_tokens=24)  # several chunks per rank


class _GradientAsWeights(torch.optim.Optimizer):
    """Each step replaces every trained weight by its gradient, so the weights a step leaves are its gradients."""

    def __init__(self, params):
        super().__init__(params, {"lr": 1.0})  # lr: read by the throughput logging only

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.copy_(p.grad)
        return loss


class _GradientsOut:
    def configure_optimizers(self):
        return _GradientAsWeights(self.trainable_parameters())


class GradILD(_GradientsOut, ILDModule):
    pass


class GradKD(_GradientsOut, KDModule):
    pass


def teacher() -> LlamaForCausalLM:
    torch.manual_seed(1)
    # LlamaConfig's own default of 2048 positions, as before the shared size existed.
    config = LlamaConfig(**{**TINY_LLAMA, "vocab_size": 97, "num_hidden_layers": 2, "max_position_embeddings": 2048})
    return LlamaForCausalLM(config).eval()


def student(tied: bool = True, checkpointed: bool = False) -> HybridForCausalLM:
    torch.manual_seed(2)
    model = tiny_model(mixers=("mla", "mamba"), tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    if checkpointed:
        model.gradient_checkpointing_enable()
    return model


def rows() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    out = []
    for _ in range(ROWS):
        ids = torch.randint(3, 97, (sum(DOC_LENS),), generator=generator)
        positions = torch.cat([torch.arange(n) for n in DOC_LENS])
        labels = ids.masked_fill(positions == 0, -100)  # a document's first token is never a target
        out.append(
            {"input_ids": ids, "position_ids": positions, "labels": labels, "attention_mask": torch.ones_like(ids)}
        )
    return out


def modules() -> dict[str, tuple[ILDModule | KDModule, str]]:
    """Fresh modules, identical on every call: {stage: (module, state-dict prefix of its student)}."""
    return {
        "ild": (GradILD({"assigned": student()}, teacher(), OPTIM), "students.assigned."),
        "kd": (GradKD(student(), teacher(), OPTIM, KD_LOSS), "student."),
        "kd_untied": (GradKD(student(tied=False), teacher(), OPTIM, KD_LOSS), "student."),
        "kd_checkpointed": (GradKD(student(checkpointed=True), teacher(), OPTIM, KD_LOSS), "student."),
    }


def run_zero3_processes(module: str, out: Path, label: str, timeout: int = 300) -> None:
    """`python -m <module> <out>`, whose __main__ runs ZeRO-3 steps on 2 CPU processes (zero3_cpu_trainer), writes its
    records under `out` and ends with leave_zero3_process(); it must exit 0."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", module, str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"},  # CPU processes even on a GPU host
    )
    print(f"{label} on 2 CPU processes: {time.perf_counter() - start:.1f} s")
    assert result.returncode == 0, result.stderr[-4000:]


def leave_zero3_process() -> None:
    """The end of such a process, every record written. Under load, interpreter teardown with DeepSpeed's gloo groups
    alive aborted once ("terminate called without an active exception", exit -6): close the group, leave at once."""
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def zero3_cpu_trainer(callbacks: list | None = None):
    """A one-step Lightning Trainer under DeepSpeed ZeRO-3 on 2 CPU processes, every parameter partitioned (the
    persistence threshold 0: no small parameter stays replicated)."""
    import lightning as L

    from train.runtime.trainer import make_strategy

    strategy = make_strategy({"name": "deepspeed_zero3", "stage": 3})
    strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        precision="32-true",
        max_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def zero3_steps(out: Path) -> None:
    """One step of each stage under ZeRO-3 on 2 CPU processes; rank 0 writes the consolidated students."""

    from train.runtime.deepspeed_strategy import consolidated_state_dict

    for name, (module, prefix) in modules().items():
        trainer = zero3_cpu_trainer()
        trainer.fit(module, DataLoader(rows(), batch_size=ROWS // 2))
        trainer.save_checkpoint(out / f"{name}.ckpt")
        if trainer.is_global_zero:
            torch.save(consolidated_state_dict(out / f"{name}.ckpt", prefix), out / f"{name}.pt")


def reference_step(module: ILDModule | KDModule) -> None:
    """The same step on one process without DeepSpeed, the whole batch at once, loss as training_step's."""
    batch = torch.utils.data.default_collate(rows())
    module.train()
    if isinstance(module, KDModule):
        loss = module._loss(batch).loss
    else:
        loss = torch.stack(list(module.layer_losses(batch).values())).sum()
    loss.backward()
    module.configure_optimizers().step()


def test_zero3_ild_and_kd_steps_match_single_process(tmp_path):
    from train.runtime.deepspeed_strategy import load_consolidated

    run_zero3_processes("tests.train.test_deepspeed_zero3_cpu", tmp_path, "ZeRO-3 steps")
    for name, (module, _) in modules().items():
        live = module.students["assigned"] if name == "ild" else module.student
        trained = {k for k, p in live.named_parameters(remove_duplicate=False) if p.requires_grad}
        initial = {k: v.clone() for k, v in live.state_dict().items()}
        reference_step(module)
        expected = live.state_dict()
        got = student(tied=name != "kd_untied")
        load_consolidated(got, torch.load(tmp_path / f"{name}.pt"))  # as the pipeline loads the exported student
        got = got.state_dict()
        assert got.keys() == expected.keys()
        for key, want in expected.items():
            if key not in trained:  # frozen (ILD trains the mixers only): must come back unchanged
                assert torch.equal(got[key], initial[key]), f"{name}: frozen {key} changed"
                continue
            assert want.norm() > 0, f"{name}: {key} has no gradient in the reference"
            err = ((got[key] - want).norm() / want.norm()).item()
            assert err <= 1e-5, f"{name}: the gradient of {key} is off by {err:.2e} (relative)"


if __name__ == "__main__":
    zero3_steps(Path(sys.argv[1]))
    leave_zero3_process()
