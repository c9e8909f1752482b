"""Which scaled-dot-product-attention kernels training runs, reported once per stage.

PyTorch picks an SDPA kernel per call (flash, memory-efficient, cuDNN, or the math reference) and falls back to
the math kernel silently when a faster one does not take the inputs (a mask it cannot use, a head size, a dtype).
The math kernel materializes (T x S) scores per head: slower and far more memory at 2048+ tokens. The callback
profiles the second training batch's dispatched ops (CPU activity only: cheap) and logs the kernels by name, with
a warning naming the fix when the math kernel ran. Teacher (Hugging Face sdpa) and MLA calls are both counted.
Not the first batch: that one compiles (torch.compile, Triton autotuning), and profiling those millions of
compile-time ops took minutes on the H100; the second batch dispatches the same attention kernels.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

import lightning as L
from torch.profiler import ProfilerActivity, profile

from .faults import stage_name

log = logging.getLogger(__name__)

# ATen's forward op of each SDPA backend (the dispatcher's choice is visible as the op it calls).
SDPA_KERNELS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash_cpu",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
    "aten::_scaled_dot_product_attention_math": "math",
}


def count_sdpa_kernels(events: Iterable[Any]) -> dict[str, int]:
    """{backend: calls} from profiler events (anything with `.key` and `.count`, e.g. `prof.key_averages()`)."""
    counts: Counter[str] = Counter()
    for event in events:
        backend = SDPA_KERNELS.get(event.key)
        if backend:
            counts[backend] += event.count
    return dict(counts)


def report_sdpa_kernels(where: str, counts: dict[str, int]) -> None:
    if not counts:
        log.info("%s: no scaled_dot_product_attention calls in the profiled step", where)
        return
    listed = ", ".join(f"{backend} x{n}" for backend, n in sorted(counts.items()))
    log.info("%s: attention kernels in a training step: %s", where, listed)
    if counts.get("math"):
        log.warning(
            "%s: %d attention calls fell back to PyTorch's math kernel (slow, O(T^2) memory per head): check "
            "the dtype (bf16/fp16 on GPU), head sizes (flash: q, k and v of one size <= 256) and the attention "
            "implementation (teacher.attn_implementation)",
            where,
            counts["math"],
        )


class SDPAKernelReport(L.Callback):
    """Profiles one training batch of a fit (the second by default) and reports its SDPA kernels (`kernels` keeps
    the counts; None when the fit ended before that batch)."""

    def __init__(self, at_batch: int = 1) -> None:
        self.at_batch = at_batch
        self.kernels: dict[str, int] | None = None
        self._profiler: profile | None = None
        self._batches = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self._batches += 1
        if self._batches == self.at_batch + 1 and self.kernels is None and self._profiler is None:
            self._profiler = profile(activities=[ProfilerActivity.CPU])
            self._profiler.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._profiler is None:
            return
        self._stop()
        if trainer.is_global_zero:
            report_sdpa_kernels(stage_name(trainer), self.kernels or {})

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._profiler is not None:
            self._stop()

    def _stop(self) -> None:
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        self.kernels = count_sdpa_kernels(profiler.key_averages())
