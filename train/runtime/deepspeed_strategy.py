"""DeepSpeed ZeRO through Lightning, as the pipeline needs it.

`ZebraDeepSpeedStrategy` is Lightning's DeepSpeedStrategy with three additions:

- resumes it cannot do are refused in one line before anything loads (`check_resumable`: another world size, a
  single-file checkpoint);
- it also runs on CPU processes (gloo), where DeepSpeed uses its CPU accelerator: Lightning allows only CUDA, but
  the ZeRO partitioning, the sharded checkpoints and their consolidation are the same code, so CI tests them;
- under ZeRO-3 each student decoder layer is a ZeRO "leaf" module: its parameters are gathered once when the layer
  starts, for forward and again for backward (the mixers read some weights directly, e.g. the depthwise conv
  kernel, instead of calling their submodules, which per-submodule gathering would miss). Their gradients are
  reduced in a hook that runs after the layer's backward only if a layer input requires grad (train/stages/ild.py).

Parameters read outside their module's forward (KD's lm_head weight, tied or not) need nothing here: DeepSpeed
gathers a parameter read as a module attribute during the engine's forward (its external-parameter discovery).

The frozen teacher is never part of the LightningModule's module tree (train/stages/module.py), so it is neither
partitioned by this engine, nor in the optimizer, nor in checkpoints; it is built with plain `from_pretrained` before
the Trainer exists, so no `zero.Init` context ever meets Hugging Face's weight loading. With `teacher.shard` a second,
inference-only ZeRO-3 engine partitions it at fit start (train/runtime/sharded_teacher.py).

`consolidated_state_dict` turns a ZeRO-2/3 checkpoint directory into the fp32 master weights (DeepSpeed's
zero_to_fp32), which is what the stages save as the trained student.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from .checkpoint_io import check_resumable


class ZebraDeepSpeedStrategy(DeepSpeedStrategy):
    strategy_name = "zebra_deepspeed"

    def _on_cpu(self) -> bool:
        return self.parallel_devices is not None and all(d.type == "cpu" for d in self.parallel_devices)

    def setup_environment(self) -> None:
        if self._on_cpu():  # Lightning's DeepSpeedStrategy refuses non-CUDA accelerators; DeepSpeed itself does not
            DDPStrategy.setup_environment(self)
            return
        super().setup_environment()

    def setup_distributed(self) -> None:
        if self._on_cpu():  # CPU devices carry no index for Lightning's per-rank GPU check
            from lightning.fabric.utilities.seed import reset_seed

            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()
            return
        super().setup_distributed()

    @property
    def root_device(self) -> torch.device:
        device = super().root_device
        # deepspeed.initialize takes the device index as the rank's device; CPU devices have none.
        return torch.device("cpu", self.local_rank) if device.type == "cpu" else device

    def setup(self, trainer: Any) -> None:
        if self.zero_stage_3:
            from deepspeed.utils import set_z3_leaf_modules

            from models.hybrid import HybridDecoderLayer

            set_z3_leaf_modules(self.lightning_module, [HybridDecoderLayer], raise_if_not_found=False)
        super().setup(trainer)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        file_ok = bool(self.load_full_weights and self.zero_stage_3)
        check_resumable(checkpoint_path, deepspeed=True, world_size=self.world_size, file_ok=file_ok)
        return super().load_checkpoint(checkpoint_path, weights_only)


def make_deepspeed_strategy(**settings: Any) -> ZebraDeepSpeedStrategy:
    """The strategy from the `strategy` config group (DeepSpeedStrategy keyword arguments); gloo on CPU."""
    settings = dict(settings)
    settings.setdefault("process_group_backend", "gloo" if not torch.cuda.is_available() else None)
    if settings["process_group_backend"] is None:
        settings.pop("process_group_backend")
    return ZebraDeepSpeedStrategy(**settings)


def is_deepspeed(strategy: Any) -> bool:
    return isinstance(strategy, DeepSpeedStrategy)


def offloads_optimizer(strategy: Any) -> bool:
    """Whether a DeepSpeed strategy keeps the optimizer state in CPU (or NVMe) memory (ZeRO-Offload)."""
    if not is_deepspeed(strategy):
        return False
    offload = strategy.config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") != "none"


def is_zero3(param: torch.Tensor) -> bool:
    """Whether ZeRO-3 manages `param` (partitioned or persistent, it then carries DeepSpeed's `ds_id`)."""
    return hasattr(param, "ds_id")


def consolidated_state_dict(checkpoint_dir: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """fp32 weights from a ZeRO checkpoint directory (all ranks' shards merged), keys relative to the
    LightningModule, restricted to those under `prefix` (which is removed), e.g. "student."."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir))
    out = {}
    for key, tensor in state.items():
        key = key.removeprefix("_forward_module.")  # Lightning's wrapper around the LightningModule
        if key.startswith(prefix):
            out[key[len(prefix) :]] = tensor
    if not out:
        raise KeyError(f"no weights under {prefix!r} in the ZeRO checkpoint {checkpoint_dir}")
    return out


def load_consolidated(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load consolidated weights; only tied copies (absent from ZeRO's deduplicated state) may be missing."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise KeyError(f"consolidated ZeRO weights do not fit the student: missing {missing}, unexpected {unexpected}")
    if tied:
        model.tie_weights()
