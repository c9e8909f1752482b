"""GPU: the init stage's calibration (models/init/calibrate.py) on CUDA, where the Mamba2 layers run mamba-ssm's
Triton scan and gated norm and GDN runs fla, under bf16 autocast as the init stage places it, fits the same
output-norm weights as the pure-torch path on the CPU in fp32. The error is printed before the assert."""

import copy

import torch

from models.init import convert_teacher
from models.init.calibrate import calibrate_student
from models.teachers import load_teacher
from tests.models.test_init import saved_teacher
from tests.models.tiny import rel_err

MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)


def test_calibration_on_cuda_fits_the_cpu_weights(tmp_path):
    teacher, spec = load_teacher(saved_teacher("llama", tmp_path))
    on_cpu, _ = convert_teacher(teacher, spec, mixer_types=["mamba", "gdn", "mla"], mla=MLA)
    on_gpu = copy.deepcopy(on_cpu)
    ids = torch.randint(0, 101, (2, 128), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(80), torch.arange(48)]).expand(2, 128)  # two packed documents per row
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": positions}
    expected = calibrate_student(teacher, on_cpu, [batch])
    teacher, on_gpu = teacher.cuda(), on_gpu.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = calibrate_student(teacher, on_gpu, [{k: v.cuda() for k, v in batch.items()}])
    for name in ("model.layers.0.mamba.norm.weight", "model.layers.1.gdn.o_norm.weight"):
        err = rel_err(on_gpu.get_parameter(name).cpu(), on_cpu.get_parameter(name))
        print(f"{name}: CUDA bf16 vs CPU fp32 fitted weight rel err {err:.1e}")
        assert err < 5e-2
    for cpu_row, gpu_row in zip(expected, got, strict=True):
        print(
            f"layer {cpu_row['layer']}: error after the fit, CPU {cpu_row['calib_rel_err_after']:.4f}, CUDA "
            f"{gpu_row['calib_rel_err_after']:.4f}"
        )
        assert abs(cpu_row["calib_rel_err_after"] - gpu_row["calib_rel_err_after"]) < 2e-2
