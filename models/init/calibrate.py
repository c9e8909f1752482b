"""Calibration: after initialization from attention, fit what the teacher's weights alone cannot set (each kind's
`MixerKind.calibration`: for Mamba2 and Gated DeltaNet the output scale per channel, models/output_fit.py) to the
teacher's attention outputs on real text. Each layer sees the teacher's input to it, as in layer-wise distillation.

    rows = calibrate_student(teacher, student, batches)   # [{"layer": 3, "mixer": ..., "calib_rel_err_after": ...}]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from transformers import PreTrainedModel

from ..hybrid import HybridForCausalLM
from ..teachers import adapter_for


def calibrated_layers(student: HybridForCausalLM) -> list[int]:
    """The layers whose kind has something to calibrate."""
    return [i for i, layer in enumerate(student.model.layers) if layer.kind.calibration is not None]


@torch.no_grad()
def calibrate_student(
    teacher: PreTrainedModel, student: HybridForCausalLM, batches: Iterable[Mapping[str, torch.Tensor]]
) -> list[dict]:
    """Fit the student's calibrated layers on `batches` (input_ids, attention_mask, position_ids; packed documents
    are kept apart as in training) on the models' device; the fits are written into the student. Returns a report
    row per calibrated layer: its relative output error on the calibration tokens before and after."""
    layers = calibrated_layers(student)
    if not layers:
        return []
    fits = {i: student.model.layers[i].kind.calibration(student.model.layers[i].mixer) for i in layers}
    adapter = adapter_for(teacher)
    dtype = next(student.parameters()).dtype
    seen = 0
    for batch in batches:
        trace = adapter.capture(teacher, batch, layers)
        positions = batch["position_ids"]
        docs = student.model.documents(positions)
        cos, sin = student.model.rope(positions)
        for i, fit in fits.items():
            normed = student.model.layers[i].input_layernorm(trace.inputs[i].to(dtype))
            fit.add(normed, cos, sin, docs, trace.attn_outputs[i], batch["attention_mask"])
        seen += 1
    if seen == 0:
        raise ValueError("calibration got no batch of text")
    return [{"layer": i, "mixer": student.model.layers[i].layer_type, **fit.apply()} for i, fit in fits.items()]
