"""The SDPA kernel report names the backend each attention call took and warns on the math fallback (forced here
with sdpa_kernel; on CPU the default is the fused flash_cpu kernel), through a real Lightning fit."""

from __future__ import annotations

import logging

import lightning as L
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from train.runtime.sdpa_report import SDPAKernelReport


class TinyAttention(L.LightningModule):
    def __init__(self, backends: list[SDPBackend] | None):
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)
        self.backends = backends

    def training_step(self, batch, batch_idx):
        q, k, v = self.proj(batch[0]).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)  # (B, H, T, 8) each
        mask = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool).tril()
        if self.backends is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            with sdpa_kernel(self.backends):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(module: L.LightningModule, tmp_path, steps: int = 3) -> SDPAKernelReport:
    report = SDPAKernelReport()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(6, 10, 16)), batch_size=2)
    trainer = L.Trainer(
        default_root_dir=str(tmp_path / "kd"),
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[report],
    )
    trainer.fit(module, data)
    return report


def test_fused_kernel_is_reported_without_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="train.runtime.sdpa_report"):
        report = _fit(TinyAttention(None), tmp_path)
    assert report.kernels == {"flash_cpu": 1}  # one profiled step (the second), one call
    assert "kd: attention kernels in a training step: flash_cpu x1" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_math_fallback_is_reported_as_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="train.runtime.sdpa_report"):
        report = _fit(TinyAttention([SDPBackend.MATH]), tmp_path)
    assert report.kernels == {"math": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "kd: 1 attention calls fell back to PyTorch's math kernel" in warnings[0]


def test_a_fit_shorter_than_the_profiled_step_reports_nothing(tmp_path):
    # The first batch compiles (torch.compile, Triton autotuning): it is never the profiled one.
    assert _fit(TinyAttention(None), tmp_path, steps=1).kernels is None
