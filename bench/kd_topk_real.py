"""How close offline KD from a cached top-k (`kd.teacher_cache`, train/losses/kd_topk.py) is to the full-vocabulary
forward KL (train/losses/kd.py), on the real teacher's distributions: SmolLM2-135M-Instruct over Python source that
ships with the interpreter (the `json` and `argparse` modules), on the CPU in fp32.

For each student and k: the top-k loss against the full KL (the log-sum inequality puts it below), and the cosine
between their gradients with respect to the student's final hidden states (what training follows). Students: the
recipe's initialized student (8 MLA + 22 Mamba2 at SMART's map from docs/fidelity.md, the start of KD) and the
teacher's own final hidden states with Gaussian noise scaled to a per-token KL near 0.5 and 0.1 nats (a student
part-way through and late in KD; the main fidelity row measured KL 0.54 at 16M KD tokens).

    python -m bench.kd_topk_real --teacher /path/SmolLM2-135M-Instruct.Q4_1.gguf [--tokens 1024]

Writes bench/results/kd_topk_smollm2_cpu.json.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from train.losses import KDLossConfig, kd_loss, kd_topk_loss
from train.losses.kd_topk import teacher_topk

RESULTS = Path(__file__).resolve().parent / "results" / "kd_topk_smollm2_cpu.json"
KS = (8, 16, 64, 256, 1024)
SMART_MAP = [0, 4, 7, 14, 21, 23, 26, 29]  # docs/fidelity.md, the main row's selection
PRESET_MLA = dict(kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64, q_lora_rank=None)


def source_ids(tokenizer, tokens: int) -> torch.Tensor:
    """(1, tokens) ids of Python source shipped with the interpreter: real code, no download."""
    import argparse as argparse_module
    import json as json_module

    text = inspect.getsource(json_module.decoder) + inspect.getsource(argparse_module)
    return tokenizer(text, return_tensors="pt")["input_ids"][:, :tokens]


def gap_rows(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, head: torch.Tensor, ids: torch.Tensor, ks=KS
) -> list[dict]:
    """Per k: the top-k loss vs the full KL and the cosine of their gradients wrt the student's hidden states
    (1, T, D); both models end in `head` (the student's lm_head starts as the teacher's). The full loss, its gradient
    and the teacher's logits are computed once for all k."""
    cfg = KDLossConfig(use_triton=False)
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    h_full = student_hidden.detach().requires_grad_(True)
    full = kd_loss(h_full, head, teacher_hidden, head, targets, cfg)
    full.loss.backward()
    with torch.no_grad():
        teacher_logits = F.linear(teacher_hidden, head)
    shape = teacher_logits.shape[:2]
    rows = []
    for k in ks:
        top_ids, logp, rest = teacher_topk(teacher_logits.reshape(-1, teacher_logits.shape[-1]), k, cfg.temperature)
        h_top = student_hidden.detach().requires_grad_(True)
        top = kd_topk_loss(h_top, head, top_ids.reshape(*shape, k), logp.reshape(*shape, k), rest.reshape(shape),
                           targets, cfg)  # fmt: skip
        top.loss.backward()
        cos = F.cosine_similarity(h_full.grad.flatten(), h_top.grad.flatten(), dim=0).item()
        rows.append({"k": k, "full_kl": full.loss.item(), "topk_kl": top.loss.item(), "relative_gap": 1 -
                     top.loss.item() / full.loss.item(), "grad_cosine": cos,
                     "teacher_mass_in_topk": logp.exp().sum(-1).mean().item()})  # fmt: skip
    return rows


def noisy_hidden(hidden: torch.Tensor, head: torch.Tensor, teacher_logits: torch.Tensor, target_kl: float):
    """The teacher's final hidden states plus Gaussian noise whose scale (bisected) gives about `target_kl`."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(hidden.shape, generator=g) * hidden.std()
    logp_t = teacher_logits.log_softmax(-1)

    def kl(scale: float) -> float:
        logq = F.linear(hidden + scale * noise, head).log_softmax(-1)
        return (logp_t.exp() * (logp_t - logq)).sum(-1).mean().item()

    low, high = 0.0, 4.0
    for _ in range(30):
        mid = (low + high) / 2
        low, high = (mid, high) if kl(mid) < target_kl else (low, mid)
    return hidden + (low + high) / 2 * noise


@torch.no_grad()
def student_hiddens(teacher, spec, ids: torch.Tensor, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    from models.init import convert_teacher

    head = teacher.lm_head.weight
    logits = F.linear(hidden, head)
    mamba = dict(d_state=64, headdim=64)
    student, _ = convert_teacher(teacher, spec, mla_layers=SMART_MAP, mla=PRESET_MLA, mamba=mamba)
    return {
        "initialized student (8 MLA + 22 Mamba2)": student.eval().model(ids).last_hidden_state,
        "teacher + noise, KL ~0.5": noisy_hidden(hidden, head, logits, 0.5),
        "teacher + noise, KL ~0.1": noisy_hidden(hidden, head, logits, 0.1),
    }


def measure(teacher, spec, tokenizer, tokens: int, ks=KS) -> dict:
    ids = source_ids(tokenizer, tokens)
    with torch.no_grad():
        teacher_hidden = teacher.model(ids).last_hidden_state
    head = teacher.lm_head.weight.detach()  # the student's head starts as the teacher's (tied embeddings copied)
    rows = {}
    for name, hidden in student_hiddens(teacher, spec, ids, teacher_hidden).items():
        rows[name] = gap_rows(hidden, teacher_hidden, head, ids, ks)
    return {"tokens": ids.shape[1], "vocab": head.shape[0], "students": rows}


def table(result: dict) -> str:
    lines = ["| student | k | teacher mass in top-k | full KL | top-k KL | gap | gradient cosine |", "|---" * 7 + "|"]
    for name, rows in result["students"].items():
        for r in rows:
            lines.append(
                f"| {name} | {r['k']} | {r['teacher_mass_in_topk']:.3f} | {r['full_kl']:.4f} | {r['topk_kl']:.4f} | "
                f"{100 * r['relative_gap']:.1f} % | {r['grad_cosine']:.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="SmolLM2 .gguf file or HF directory")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    from models.teachers import load_teacher, resolve_teacher_path

    start = time.perf_counter()
    path = resolve_teacher_path(args.teacher)
    teacher, spec = load_teacher(path)
    from transformers import AutoTokenizer

    result = measure(teacher.eval(), spec, AutoTokenizer.from_pretrained(path), args.tokens)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(table(result))
    from bench.common import environment

    args.out.write_text(json.dumps({"environment": environment(), **result}, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
