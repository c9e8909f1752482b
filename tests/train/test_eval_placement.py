"""Held-out evaluation runs where and how the training stages ran (train.stages.eval.eval_placement): a GPU run's eval
stage must not fall back to the host in fp32 (the first real-teacher run's eval took > 10 minutes that way). On
CPU the device cannot differ, so the check is the precision: every forward of the eval stage runs under the
trainer's bf16 autocast, and the models end where they started."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel

from tests.train.test_pipeline import small
from train.config.schema import TrainerConfig
from train.pipeline import run
from train.stages import eval as eval_stage
from train.stages.eval import eval_placement


def test_placement_follows_the_trainer_config():
    assert eval_placement(TrainerConfig(accelerator="cpu", precision="32-true")).autocast is None
    cpu_bf16 = eval_placement(TrainerConfig(accelerator="cpu", precision="bf16-mixed"))
    assert cpu_bf16.device.type == "cpu" and cpu_bf16.autocast is torch.bfloat16
    if torch.cuda.is_available():
        assert eval_placement(TrainerConfig(accelerator="gpu", precision="bf16-mixed")).device.type == "cuda"
    else:
        with pytest.raises(RuntimeError, match="trainer.accelerator='gpu'"):
            eval_placement(TrainerConfig(accelerator="gpu", precision="bf16-mixed"))


def test_eval_stage_runs_every_model_forward_under_the_training_precision(
    tmp_path,
    teacher_cache,
    monkeypatch,
):
    cfg = small(tmp_path / "run", teacher_cache, "stages=[init,eval]", "trainer.precision=bf16-mixed")
    seen: list[tuple[str, str, torch.dtype | None]] = []
    in_eval = []
    stage_eval = eval_stage.run
    monkeypatch.setattr(eval_stage, "run", lambda ctx: in_eval.append(1) or stage_eval(ctx))

    def record(module, args, kwargs, output):
        if in_eval and isinstance(module, PreTrainedModel) and module.__class__.__name__.endswith("ForCausalLM"):
            device = next(module.parameters()).device.type
            autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
            seen.append((module.__class__.__name__, device, autocast))

    handle = torch.nn.modules.module.register_module_forward_hook(record, with_kwargs=True)
    try:
        report = run(cfg)
    finally:
        handle.remove()
    kinds = {name for name, _, _ in seen}
    assert {"LlamaForCausalLM", "HybridForCausalLM"} <= kinds, kinds  # teacher and students both evaluated
    assert all(autocast is torch.bfloat16 for _, _, autocast in seen), set(seen)
    assert report["eval_placement"] == {"device": "cpu", "autocast": "torch.bfloat16"}
