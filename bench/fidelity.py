"""The real-teacher benchmark: the whole recipe on SmolLM2-135M-Instruct, and what the student it produces is worth.

    python -m bench.fidelity --teacher /path/SmolLM2-135M-Instruct.Q4_1.gguf            # the main row
    python -m bench.fidelity --teacher ... --rows uniform,reverse_kl,no_ild --parallel 4  # ablation rows
    python -m bench.fidelity --render                                                     # docs/fidelity.md only

Each row is one `python -m train conf=smollm2_135m ...` run (the command users type) in `<out>/rows/<row>`, on
real text: Python source and documentation of the installed packages, with whole packages held out for
evaluation, plus the teacher's own answers to chat prompts (sequence-level KD) rendered with its chat template
(bench/fidelity_data.py). A row stopped by `--deadline-s` checkpoints (SIGTERM, as a preemption) and the same
command resumes it. After a row finishes, the teacher, the initialized and the final student are evaluated on
the held-out packages on the GPU (loss, perplexity, KL to the teacher, top-1 agreement), greedy code
completions and chat answers are put side by side, and everything goes to
`bench/results/fidelity_smollm2_<tag>.json`; `docs/fidelity.md` is rendered from those files.

Ablation rows change one thing at equal training tokens (rows without ILD get its steps as KD steps). Rows that
differ from `main` only after ILD reuse its `init` and `ild` stages (both candidates of every layer are aligned
there), so they cost only their own KD.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DOC = REPO / "docs" / "fidelity.md"
PRESET = "smollm2_135m"
log = logging.getLogger("bench.fidelity")


@dataclass(frozen=True)
class Row:
    """One ablation row: overrides on top of the preset, and which stages of `main` it starts from."""

    what: str  # the table's description: what this row changes
    overrides: tuple[str, ...] = ()
    reuse: tuple[str, ...] = ()  # finished stages copied from the main row (init, ild, select)
    fixed_map: bool = False  # use main's selected MLA layers as a fixed list (rows without the select stage)
    no_ild: bool = False  # ILD's steps become KD steps (equal training tokens)
    teacher_cache: bool = False  # KD from the teacher's top-k written first by python -m train.teacher_cache


ROWS: dict[str, Row] = {
    "main": Row("init + ILD (both candidates) + SMART 8 of 30 + KD, forward KL (the preset)"),
    "uniform": Row("MLA layers evenly spaced instead of SMART", ("select.rule=uniform",), reuse=("init", "ild")),
    "reverse_kl": Row("KD with reverse KL", ("kd.divergence=reverse_kl",), reuse=("init", "ild", "select")),
    "jsd": Row("KD with JSD (beta 0.5)", ("kd.divergence=jsd", "kd.jsd_beta=0.5"), reuse=("init", "ild", "select")),
    "mla4": Row("SMART 4 MLA layers", ("student.num_mla_layers=4",), reuse=("init", "ild")),
    "mla12": Row("SMART 12 MLA layers", ("student.num_mla_layers=12",), reuse=("init", "ild")),
    "no_ild": Row(
        "init + KD, no ILD (main's layer map)", ("stages=[init,kd,eval,export]",), fixed_map=True, no_ild=True
    ),
    "random_mixers": Row(
        "random mixers + KD (main's layer map; MLPs, norms, embeddings still the teacher's)",
        ("stages=[init,kd,eval,export]", "student.mixer_init=random"),
        fixed_map=True,
        no_ild=True,
    ),
    "rope_per_kv_head": Row(
        "a RoPE key per KV head (3 x 16 dims) and kv_lora_rank 112: the same 160 values per token",
        (
            "stages=[init,ild,kd,eval,export]",
            "student.mla.rope_heads=per_kv_head",
            "student.mla.qk_rope_head_dim=16",
            "student.mla.qk_nope_head_dim=48",
            "student.mla.kv_lora_rank=112",
        ),
        fixed_map=True,
    ),
    "teacher_cache": Row(
        "KD from the teacher's cached top-64 log-probs (offline KD, no teacher forward), main's init/ILD/SMART",
        ("kd.teacher_cache_k=64",),
        reuse=("init", "ild", "select"),
        teacher_cache=True,
    ),
    "mla_gdn": Row(
        "SMART 8 MLA layers, Gated DeltaNet in the others (ILD of MLA and GDN)", ("select.fill_kinds=[gdn]",)
    ),
    "smart_3kinds": Row(
        "SMART 8 MLA layers, each other layer Mamba2 or Gated DeltaNet by its ILD loss (three kinds)",
        ("select.fill_kinds=[mamba,gdn]",),
    ),
    "rank64": Row(
        "kv_lora_rank 64 (main's layer map, ILD of the assigned mixers)",
        ("stages=[init,ild,kd,eval,export]", "student.mla.kv_lora_rank=64"),
        fixed_map=True,
    ),
    "rank256": Row(
        "kv_lora_rank 256 (main's layer map, ILD of the assigned mixers)",
        ("stages=[init,ild,kd,eval,export]", "student.mla.kv_lora_rank=256"),
        fixed_map=True,
    ),
}


@dataclass
class Budget:
    ild_steps: int
    kd_steps: int
    overrides: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------- data


def prepare_data(out: Path, teacher_dir: str, args: argparse.Namespace, seed: int) -> dict[str, Path]:
    """The code corpus (train / held-out packages) and the teacher's chat answers, built once under `out/data`."""
    from bench import fidelity_data

    data = out / "data"
    if not (data / "manifest.json").exists():
        start = time.perf_counter()
        max_bytes = args.max_train_mb * 2**20 if args.max_train_mb else None
        stats = fidelity_data.build_code_corpus(data, fidelity_data.DEFAULT_HELDOUT, max_train_bytes=max_bytes)
        log.info("corpus built in %.0f s: %s", time.perf_counter() - start, _totals(stats))
    chat_path = data / "chats.jsonl.gz"
    if args.chats_file and not chat_path.exists():  # answers generated by an earlier call (same teacher, seed)
        shutil.copy(args.chats_file, chat_path)
        stats_file = Path(args.chats_file).with_name("chats_stats.json")  # how they were made, for the report
        if stats_file.exists():
            shutil.copy(stats_file, data / "chats_stats.json")
    if args.chats and not chat_path.exists():
        prompts = fidelity_data.chat_prompts_for_training(args.chats, seed, data)
        stats = fidelity_data.generate_teacher_chats(
            teacher_dir, prompts, chat_path, max_new_tokens=args.chat_tokens, batch_size=args.chat_batch
        )
        (data / "chats_stats.json").write_text(json.dumps(stats, indent=2))
        log.info("teacher chats: %s", stats)
    return {"train": data / "train.jsonl.gz", "heldout": data / "heldout.jsonl.gz", "chats": chat_path}


def _totals(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if not isinstance(v, (list, dict))}


def data_overrides(files: dict[str, Path], chat_weight: float, cache: Path) -> list[str]:
    sources = [f"{{name_or_path:'{files['train']}',weight:{1 - chat_weight}}}"]
    if chat_weight > 0 and files["chats"].exists():
        sources.append(f"{{name_or_path:'{files['chats']}',weight:{chat_weight}}}")
    # all_exhausted: the smaller chat source repeats rather than cutting the code stream to its size.
    return [f"data.sources=[{','.join(sources)}]", "data.mixture_stop=all_exhausted", f"data.cache_dir='{cache}'"]


# --------------------------------------------------------------------------------------------------- rows


def row_command(
    name: str, row: Row, args: argparse.Namespace, budget: Budget, out: Path, main_map: list[int] | None
) -> list[list[str]]:
    """The row's commands, run one after the other: the training run, after the teacher-cache writer if it has one
    (the same overrides: the cache is keyed by the run's data and KD settings)."""
    kd_steps = budget.kd_steps + (budget.ild_steps if row.no_ild else 0)
    overrides = [
        f"conf={PRESET}",
        f"teacher.name_or_path='{args.teacher}'",
        f"output_dir='{out / 'rows' / name}'",
        f"ild.max_steps={budget.ild_steps}",
        f"kd.max_steps={kd_steps}",
        f"kd.val_every_n_steps={max(1, kd_steps // 10)}",  # ten points on the held-out curve
        "logger=csv",
        *budget.overrides,
        *row.overrides,
    ]
    if row.fixed_map:
        if main_map is None:
            raise RuntimeError(f"row {name!r} uses main's layer map: run the main row first")
        overrides.append(f"student.mla_layers=[{','.join(map(str, main_map))}]")
    if not row.teacher_cache:
        return [[sys.executable, "-m", "train", *overrides]]
    overrides.append(f"kd.teacher_cache='{out / 'rows' / name / 'teacher_cache'}'")
    return [[sys.executable, "-m", module, *overrides] for module in ("train.teacher_cache", "train")]


def run_rows(names: list[str], args, budget: Budget, out: Path, deadline: float) -> dict[str, int]:
    """Start up to `args.parallel` rows at a time; SIGTERM (checkpoint and stop) at the deadline. Exit codes."""
    main_map = _selected_map(out / "rows" / "main")
    pending, running, codes = list(names), {}, {}
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            row = ROWS[name]
            folder = out / "rows" / name
            if _finished(folder):
                codes[name] = 0  # an earlier call trained it: nothing to resume
                continue
            folder.mkdir(parents=True, exist_ok=True)
            for stage in row.reuse:
                _reuse_stage(out / "rows" / "main" / stage, folder / stage)
            *before, command = row_command(name, row, args, budget, out, main_map)
            (folder / "command.txt").write_text("\n".join(shlex.join(c) for c in [*before, command]) + "\n")
            handle = open(folder / "train.log", "a")  # noqa: SIM115 (closed when the process ends)
            log.info("row %s: start", name)
            # The teacher-cache writer runs to its end first (its shards are atomic: a rerun finishes it); the
            # trainer is the process the deadline signals, so it checkpoints.
            failed = next((c for c in before if subprocess.run(c, stdout=handle, stderr=subprocess.STDOUT,
                                                                cwd=REPO).returncode != 0), None)  # fmt: skip
            if failed is not None:
                handle.close()
                codes[name] = 1
                log.info("row %s: %s failed, see its train.log", name, failed[2])
                continue
            running[name] = (subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO), handle)
        time.sleep(2)
        for name, (process, handle) in list(running.items()):
            if process.poll() is None and time.monotonic() > deadline:
                log.info("row %s: deadline, SIGTERM (it checkpoints; rerun to resume)", name)
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    process.kill()
            if process.poll() is not None:
                handle.close()
                codes[name] = process.returncode
                log.info("row %s: exit %d", name, process.returncode)
                del running[name]
    return codes


def _finished(row_dir: Path) -> bool:
    report = row_dir / "report.json"
    return report.exists() and "export" in json.loads(report.read_text()).get("stage_seconds", {})


def _reuse_stage(source: Path, target: Path) -> None:
    if not (source / "done.json").exists():
        raise RuntimeError(f"{source} is not finished: run the main row first")
    if not target.exists():
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints"))


def _selected_map(row_dir: Path) -> list[int] | None:
    path = row_dir / "select" / "selection.json"
    return json.loads(path.read_text())["mla_layers"] if path.exists() else None


# --------------------------------------------------------------------------------------------------- evaluation


def heldout_loader(tokenizer, heldout: Path, seq_len: int, rows: int, batch: int, cache: Path):
    """Packed rows of the held-out packages (documents the run never saw), through the training data pipeline."""
    from data.config import DataConfig, SourceConfig
    from data.datamodule import DistillDataModule

    cfg = DataConfig(
        sources=[SourceConfig(name_or_path=str(heldout))],
        seq_len=seq_len,
        micro_batch_size=batch,
        ild_fraction=0.0,
        eval_fraction=0.99,  # almost every held-out document is evaluation data (the rest is never used)
        eval_max_rows=rows,
        num_workers=0,
        cache_dir=str(cache),
    ).validate()
    data = DistillDataModule(cfg, tokenizer, phase="kd")
    data.setup()
    return data.val_dataloader()


def evaluate_row(row_dir: Path, teacher_dir: str, files: dict[str, Path], args) -> dict:
    """Held-out packages: teacher, initialized and final student; greedy code completions and chat answers."""
    from transformers import AutoTokenizer

    from models import HybridForCausalLM, student_cache_bytes, teacher_cache_bytes
    from models.teachers import load_teacher
    from train.pipeline import initialized_student_dir
    from train.stages.eval import Placement, heldout_agreement, heldout_loss

    cuda = torch.cuda.is_available()  # bf16 as in training on the GPU; CPU autocast to bf16 is slower than fp32
    placement = Placement(torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else None)
    teacher, spec = load_teacher(teacher_dir, dtype=placement.autocast or torch.float32, device=placement.device)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    loader = heldout_loader(
        tokenizer, files["heldout"], args.seq_len, args.eval_rows, 16, row_dir.parent.parent / "data" / "cache"
    )
    initialized = initialized_student_dir(row_dir)
    final = row_dir / "student"
    start = time.perf_counter()
    result: dict[str, Any] = {}
    with placement.context():
        result["teacher"] = heldout_loss(teacher, loader)
        result["teacher"]["kv_bytes_per_token"] = teacher_cache_bytes(
            spec.num_layers, spec.num_kv_heads, spec.head_dim
        ).per_token
        students = {}
        for name, path in (("initialized", initialized), ("final", final)):
            if not (path / "config.json").exists():
                continue
            student = HybridForCausalLM.from_pretrained(path, dtype=torch.float32).to(placement.device).eval()
            row = heldout_loss(student, loader)
            row.update(heldout_agreement(student, teacher, loader))
            row["kv_bytes_per_token"] = student_cache_bytes(student.config).per_token
            row["mla_layers"] = student.config.mla_layers
            result[name] = row
            students[name] = student
        result["eval_seconds"] = round(time.perf_counter() - start, 1)
        for name, model in (("teacher", teacher), ("final", students.get("final"))):
            if model is not None:
                result[name]["decode_tokens_per_s"] = decode_tokens_per_s(model, tokenizer, placement.device)
        if "final" in students:
            result["samples"] = side_by_side_samples(teacher, students["final"], tokenizer, files["heldout"], args)
    return result


def decode_tokens_per_s(model, tokenizer, device: torch.device, batch: int = 16, prompt: int = 128, new: int = 128):
    """Greedy `generate` tokens/s at a batch of `batch` prompts of `prompt` tokens, `new` tokens each (its own
    cache: the teacher's DynamicCache, the student's HybridCache), after one warmup call; forced to full length."""
    ids = torch.randint(100, len(tokenizer), (batch, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    model.generate(ids, attention_mask=torch.ones_like(ids), **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return round(batch * new / (time.perf_counter() - start), 1)


def side_by_side_samples(teacher, student, tokenizer, heldout: Path, args) -> dict[str, list[dict]]:
    """Greedy code completions of held-out files' openings, and chat answers to prompts never trained on."""
    import gzip

    from bench.fidelity_data import CHAT_PROMPTS

    def greedy(model, ids: torch.Tensor, new: int) -> str:
        out = model.generate(
            ids.to(next(model.parameters()).device),
            attention_mask=torch.ones_like(ids).to(next(model.parameters()).device),
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    code = []
    with gzip.open(heldout, "rt") as handle:
        docs = [json.loads(line)["text"] for line, _ in zip(handle, range(400), strict=False)]
    openings = [d for d in docs if d.lstrip().startswith(("def ", "class ", '"""', "import ", "from "))]
    for doc in openings[:: max(1, len(openings) // args.samples)][: args.samples]:
        prompt = "\n".join(doc.splitlines()[:12]) + "\n"
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        code.append({"prompt": prompt, "teacher": greedy(teacher, ids, 64), "student": greedy(student, ids, 64)})
    chat = []
    for prompt in CHAT_PROMPTS[: args.samples]:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        chat.append({"prompt": prompt, "teacher": greedy(teacher, ids, 96), "student": greedy(student, ids, 96)})
    return {"code": code, "chat": chat}


def row_summary(row_dir: Path) -> dict:
    """From the run itself: stage times, tokens, the pipeline's eval, the KD validation curve."""
    from train.runtime.csv_log import read_metrics

    report = json.loads((row_dir / "report.json").read_text()) if (row_dir / "report.json").exists() else {}
    summary = {
        "stage_seconds": report.get("stage_seconds", {}),
        "tokens": {s: report.get(s, {}).get("tokens_seen", 0) for s in ("ild", "kd")},
        "mixture_eval": report.get("eval"),
        "mla_layers": (report.get("select") or {}).get("mla_layers"),
        "command": (row_dir / "command.txt").read_text().strip() if (row_dir / "command.txt").exists() else None,
    }
    metrics = row_dir / "kd" / "logs" / "metrics.csv"
    if metrics.exists():
        series = read_metrics(metrics)
        steps = max((step for step, _ in series.get("train/loss", [])), default=0) + 1
        summary["curve"] = {
            "ild_tokens": summary["tokens"]["ild"],
            "kd_tokens_per_step": summary["tokens"]["kd"] / steps,
            **{k: series[k] for k in ("val/kd/ce", "val/kd/divergence", "val/kd/top1_agreement") if k in series},
        }
    return summary


# --------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="the teacher: a .gguf file, an HF directory or a Hub id")
    parser.add_argument("--out", type=Path, default=Path("outputs/fidelity"))
    parser.add_argument("--rows", default="main", help=f"comma-separated, of {list(ROWS)}")
    parser.add_argument("--parallel", type=int, default=1, help="rows trained at once on the one GPU")
    parser.add_argument("--ild-steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--kd-steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--deadline-s", type=float, default=None, help="SIGTERM the rows after this (they resume)")
    parser.add_argument("--chats", type=int, default=3000, help="teacher-answered prompts for sequence-level KD")
    parser.add_argument("--chats-file", type=Path, default=None, help="reuse an earlier call's chats.jsonl.gz")
    parser.add_argument("--chat-tokens", type=int, default=256, help="longest teacher answer")
    # 128 gave 2,060 tokens/s on an H200 (generate's per-step overhead dominates a 135M model): go wider
    parser.add_argument("--chat-batch", type=int, default=512, help="prompts per generate call")
    parser.add_argument("--chat-weight", type=float, default=0.3, help="share of KD/ILD tokens from the chats")
    parser.add_argument("--max-train-mb", type=int, default=None, help="cap on the code corpus")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--eval-rows", type=int, default=128, help="held-out packed rows (x seq-len tokens)")
    parser.add_argument("--samples", type=int, default=4, help="side-by-side code and chat samples")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--tag", default=None, help="results file suffix (default: the card, e.g. h200)")
    parser.add_argument("--render", action="store_true", help="only rewrite docs/fidelity.md from the results")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every row")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.render:
        from bench.fidelity_report import render

        render(sorted(args.results_dir.glob("fidelity_smollm2_*.json")), DOC)
        return 0
    if not args.teacher:
        parser.error("--teacher is required (a .gguf file, an HF directory or a Hub id)")
    names = [n for n in args.rows.split(",") if n]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"--rows: unknown {unknown}; known: {list(ROWS)}")
    start = time.monotonic()
    deadline = start + args.deadline_s if args.deadline_s else float("inf")
    from bench.common import environment, record
    from models.teachers import resolve_teacher_path
    from train.config import compose_config

    preset = compose_config([f"conf={PRESET}"])
    budget = Budget(args.ild_steps or preset.ild.max_steps, args.kd_steps or preset.kd.max_steps, list(args.overrides))
    out = args.out.resolve()
    teacher_dir = resolve_teacher_path(args.teacher)
    files = prepare_data(out, teacher_dir, args, seed=preset.seed)
    budget.overrides = data_overrides(files, args.chat_weight, out / "data" / "cache") + budget.overrides
    env = environment()
    tag = args.tag or env["card"].replace("NVIDIA ", "").split()[0].lower()
    results = args.results_dir / f"fidelity_smollm2_{tag}.json"
    header = {**env, "teacher": "SmolLM2-135M-Instruct", "data": _data_summary(out / "data")}
    # main first: the other rows start from its stages
    groups = [["main"], [n for n in names if n != "main"]] if "main" in names else [names]
    for group in groups:
        if not group:
            continue
        codes = run_rows(group, args, budget, out, deadline)
        for name, code in codes.items():
            row_dir = out / "rows" / name
            entry = {"what": ROWS[name].what, "exit_code": code, "budget": vars(budget) | {"overrides": None}}
            entry.update(row_summary(row_dir))
            if code == 0:
                cached = row_dir / "heldout_eval.json"  # evaluated by an earlier call: the same weights
                if not cached.exists():
                    cached.write_text(json.dumps(evaluate_row(row_dir, teacher_dir, files, args), indent=2))
                entry["heldout_packages"] = json.loads(cached.read_text())
            else:
                entry["status"] = f"stopped (exit {code}); rerun the same command to resume, see {row_dir}/train.log"
            record(results, name, entry, header)
            log.info("row %s recorded in %s", name, results)
        if any(code != 0 for code in codes.values()) and group == ["main"]:
            log.warning("main row unfinished: the other rows need its stages; rerun to resume")
            break
    from bench.fidelity_report import render

    if args.results_dir == RESULTS:
        render(sorted(RESULTS.glob("fidelity_smollm2_*.json")), DOC)
    return 0


def _data_summary(data: Path) -> dict:
    manifest = json.loads((data / "manifest.json").read_text()) if (data / "manifest.json").exists() else {}
    chats = json.loads((data / "chats_stats.json").read_text()) if (data / "chats_stats.json").exists() else {}
    return {"corpus": {k: v for k, v in manifest.items() if k != "packages"}, "chats": chats}


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    sys.exit(main())
