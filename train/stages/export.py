"""export: the final student as a Hugging Face folder, output_dir/student, in export.dtype (loads with
AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True) and generates with the compressed cache)."""

from __future__ import annotations

import torch

from .context import Context, load_student


def run(ctx: Context) -> dict:
    dtype = getattr(torch, ctx.cfg.export.dtype)
    student = load_student(ctx.latest_student_dir())
    ctx.save_student(student, ctx.out / "student", dtype=dtype)
    ctx.report["export"] = {"path": str(ctx.out / "student"), "dtype": ctx.cfg.export.dtype}
    return {}
