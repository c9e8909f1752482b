"""The KD loss alone, at a preset's lm_head shapes: our chunked loss (fused Triton kernel, and its torch-ops twin)
against Liger-Kernel's fused linear JSD (beta = 0 is forward KL, ours' default), when liger-kernel is installed.

    python -m bench.kd_loss                        # zebra_1b: 16384 tokens, hidden 2048, vocabulary 128256, bf16
    python -m bench.kd_loss --smoke                # CPU, tiny shapes: checks the harness

Each candidate runs forward + backward (gradients to the student hidden states and lm_head weight; the teacher is
a constant) on the same bf16 inputs. Reported per candidate: median milliseconds over the timed repeats, peak memory
above the inputs, the loss, and the largest gradient difference from our fused path relative to its largest
gradient entry (a different forward KL would show up there). Results go to `--out` (JSON) and stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.common import environment, median, record, sync
from train.losses import KDLossConfig, kd_loss

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def ours(use_triton: bool, chunk_tokens: int) -> Loss:
    cfg = KDLossConfig(chunk_tokens=chunk_tokens, use_triton=use_triton)

    def loss(student_hidden, student_weight, teacher_hidden, teacher_weight, targets):
        return kd_loss(
            student_hidden[None], student_weight, teacher_hidden[None], teacher_weight, targets[None], cfg
        ).loss

    return loss


def liger() -> Loss | None:
    try:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
    except ImportError:
        return None
    jsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)  # beta 0: KL(teacher || student), per token mean

    def loss(student_hidden, student_weight, teacher_hidden, teacher_weight, targets):
        return jsd(student_hidden, student_weight, teacher_hidden, teacher_weight, targets)

    return loss


def inputs(tokens: int, hidden: int, vocab: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Hidden states and head weights at the scale of trained Llama ones (logits with a spread of a few units)."""
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale):
        return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)

    teacher_hidden = randn(tokens, hidden, scale=1.0)
    return {
        "student_hidden": (teacher_hidden + randn(tokens, hidden, scale=0.5)).requires_grad_(),
        "student_weight": randn(vocab, hidden, scale=hidden**-0.5 * 2).requires_grad_(),
        "teacher_hidden": teacher_hidden,
        "teacher_weight": randn(vocab, hidden, scale=hidden**-0.5 * 2),
        "targets": torch.randint(0, vocab, (tokens,), device=device, generator=g),
    }


def measure(loss_fn: Loss, data: dict[str, torch.Tensor], warmup: int, repeats: int) -> dict:
    device = data["student_hidden"].device
    times, loss, start_bytes = [], None, 0
    for i in range(warmup + repeats):
        for name in ("student_hidden", "student_weight"):
            data[name].grad = None
        if i == warmup and device.type == "cuda":  # the peak over what is held before a step: the inputs
            torch.cuda.reset_peak_memory_stats()
            start_bytes = torch.cuda.memory_allocated()
        sync()
        start = time.perf_counter()
        loss = loss_fn(*data.values())
        loss.backward()
        sync()
        if i >= warmup:
            times.append(1e3 * (time.perf_counter() - start))
    result: dict[str, Any] = {"ms": median(times), "loss": float(loss.detach())}
    if device.type == "cuda":
        result["peak_memory_above_inputs_gib"] = (torch.cuda.max_memory_allocated() - start_bytes) / 2**30
    # on the host: kept for the comparison, they must not count in the next candidate's peak
    result["grads"] = [data[name].grad.float().cpu() for name in ("student_hidden", "student_weight")]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per step (zebra_1b: micro-batch 8 x 2048)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--chunk-tokens", type=int, default=4096, help="our loss's chunk (kd.chunk_tokens)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks the harness")
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/kd_loss_<card>.json)")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.hidden, args.vocab, args.chunk_tokens, args.repeats, args.warmup = 64, 32, 1000, 16, 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    header = environment()
    out = Path(args.out or f"bench/results/kd_loss_{header['card'].replace(' ', '_')}.json")

    candidates: dict[str, Loss | None] = {
        "ours_fused_triton": ours(True, args.chunk_tokens) if device.type == "cuda" else None,
        "ours_torch_ops": ours(False, args.chunk_tokens),
        "liger_fused_linear_jsd_beta0": liger() if device.type == "cuda" else None,
    }
    data = inputs(args.tokens, args.hidden, args.vocab, device, dtype)
    results: dict[str, Any] = {}
    reference = None
    for name, loss_fn in candidates.items():
        if loss_fn is None:
            results[name] = "not run: needs CUDA" + (" and liger-kernel" if name.startswith("liger") else "")
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result = measure(loss_fn, data, args.warmup, args.repeats)
        grads = result.pop("grads")
        reference = reference or grads
        result["grad_max_diff_vs_first"] = [
            float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(grads, reference, strict=True)
        ]
        results[name] = result
        print(f"{name}: {json.dumps(result)}", flush=True)
    shape = {"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab, "chunk_tokens": args.chunk_tokens}
    key = f"kd_loss/t{args.tokens}_h{args.hidden}_v{args.vocab}_c{args.chunk_tokens}"
    record(out, key, {**shape, "dtype": str(dtype), **results}, header)


if __name__ == "__main__":
    main()
