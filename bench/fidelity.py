"""The real-teacher benchmark: the whole recipe on SmolLM2-135M-Instruct, and what the student it produces is worth.

    python -m bench.fidelity --teacher /path/SmolLM2-135M-Instruct.Q4_1.gguf            # the main row
    python -m bench.fidelity --teacher ... --rows main,baseline,uniform --parallel 2 --ablation-kd-steps 300
    python -m bench.fidelity --render                                                     # docs/fidelity.md only

Each row is one `python -m train conf=smollm2_135m ...` run (the command users type) in `<out>/rows/<row>`, on
real text: Python source and documentation of the installed packages, with whole packages held out for
evaluation, plus the teacher's own answers to chat prompts (sequence-level KD) rendered with its chat template
(bench/fidelity_data.py). A row stopped by `--deadline-s` checkpoints (SIGTERM, as a preemption) and the same
command resumes it. After a row finishes, the teacher, the initialized and the final student are evaluated on
the held-out packages on the GPU (loss, perplexity, KL to the teacher, top-1 agreement), greedy code
completions and chat answers are put side by side, and everything goes to
`bench/results/fidelity_smollm2_<tag>.json`; `docs/fidelity.md` is rendered from those files.

Ablation rows change one thing at equal training tokens (rows without ILD get its steps as KD steps); with
`--ablation-kd-steps` they train a shorter KD than main, and the `baseline` row is the preset at that budget. Rows
that differ from `main` only after ILD reuse its `init` and `ild` stages (both candidates of every layer are aligned
there), so they cost only their own KD, and with `--parallel` they start beside main's KD as soon as the stages they
reuse are finished. What that buys is overlap, not throughput: one KD row keeps an H100 busy (two at once each ran at
about half the tokens/s, 2026-12-07), but a row's start (data, compile, autotune) leaves the GPU idle for minutes.
"""

from __future__ import annotations

import argparse
import functools
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


GDN_MICRO_BATCHES = ("data.micro_batch_size=4", "trainer.accumulate_grad_batches=4")

ROWS: dict[str, Row] = {
    "main": Row("init + ILD (both candidates) + SMART 8 of 30 + KD, forward KL (the preset)"),
    "baseline": Row(
        "the preset at the ablation budget (main's init, ILD and SMART; its own KD)", reuse=("init", "ild", "select")
    ),
    "kd_lr1e3": Row(
        "KD learning rate 1e-3 instead of the preset's 3e-4", ("kd.lr=1.0e-3",), reuse=("init", "ild", "select")
    ),
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
    "zebra_init": Row(
        "Zebra-Llama's Mamba2 init (random gate rows, no output calibration), main's layer map",
        ("stages=[init,ild,kd,eval,export]", "student.mamba.gate_init=random", "student.calibration_rows=0"),
        fixed_map=True,
    ),
    "rope_shared": Row(
        "one RoPE key shared by all heads (32 dims) and kv_lora_rank 128 (DeepSeek's layout, the preset's until "
        "12-08): the same 160 values per token",
        (
            "stages=[init,ild,kd,eval,export]",
            "student.mla.rope_heads=shared",
            "student.mla.qk_rope_head_dim=32",
            "student.mla.qk_nope_head_dim=32",
            "student.mla.kv_lora_rank=128",
        ),
        fixed_map=True,
    ),
    "teacher_cache": Row(
        "KD from the teacher's cached top-64 log-probs (offline KD, no teacher forward), main's init/ILD/SMART",
        ("kd.teacher_cache_k=64",),
        reuse=("init", "ild", "select"),
        teacher_cache=True,
    ),
    # On Hopper GDN trains through the torch reference (fla's backward is refused there, models/gated_delta.py),
    # which keeps every chunk's intermediates: ILD at 16 rows per micro-batch ran out of an H100's memory beside
    # main's KD. Four micro-batches of 4 rows: the same 16 rows per optimizer step as every other row.
    "mla_gdn": Row(
        "SMART 8 MLA layers, Gated DeltaNet in the others (ILD of MLA and GDN)",
        ("select.fill_kinds=[gdn]", *GDN_MICRO_BATCHES),
    ),
    "smart_3kinds": Row(
        "SMART 8 MLA layers, each other layer Mamba2 or Gated DeltaNet by its ILD loss (three kinds)",
        ("select.fill_kinds=[mamba,gdn]", *GDN_MICRO_BATCHES),
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
    kd_steps: int  # the main row's
    ablation_kd_steps: int | None = None  # every other row's (equal tokens among them); None: kd_steps
    overrides: list[str] = field(default_factory=list)

    def steps(self, name: str, row: Row) -> tuple[int, int]:
        """(ILD, KD) steps of a row: rows without ILD get its steps as KD steps (equal training tokens)."""
        kd = self.kd_steps if name == "main" or self.ablation_kd_steps is None else self.ablation_kd_steps
        return self.ild_steps, kd + (self.ild_steps if row.no_ild else 0)


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
    """The row's commands, run one after the other: the teacher-cache writer if it has one (the training run's
    overrides: the cache is keyed by the run's data and KD settings), the training run, its held-out evaluation."""
    ild_steps, kd_steps = budget.steps(name, row)
    overrides = [
        f"conf={PRESET}",
        f"teacher.name_or_path='{args.teacher}'",
        f"output_dir='{out / 'rows' / name}'",
        f"ild.max_steps={ild_steps}",
        f"kd.max_steps={kd_steps}",
        f"kd.val_every_n_steps={max(1, kd_steps // 10)}",  # ten points on the held-out curve
        "logger=csv",
        *budget.overrides,
        *row.overrides,
    ]
    if name != "main":  # the pipeline's own eval stage (mixture eval, samples) is main's; rows get the held-out one
        stages = next((o.partition("=")[2] for o in row.overrides if o.startswith("stages=")), None)
        stages = stages[1:-1].split(",") if stages else _preset_stages()
        overrides.append(f"stages=[{','.join(s for s in stages if s != 'eval')}]")
    if row.fixed_map:
        if main_map is None:
            raise RuntimeError(f"row {name!r} uses main's layer map: run the main row first")
        overrides.append(f"student.mla_layers=[{','.join(map(str, main_map))}]")
    evaluate = [sys.executable, "-m", "bench.fidelity", "--evaluate-row", name, "--teacher", args.teacher]
    evaluate += ["--out", str(out), "--seq-len", str(args.seq_len), "--eval-rows", str(args.eval_rows)]
    evaluate += ["--samples", str(args.samples)]
    if not row.teacher_cache:
        return [[sys.executable, "-m", "train", *overrides], evaluate]
    overrides.append(f"kd.teacher_cache='{out / 'rows' / name / 'teacher_cache'}'")
    return [*([sys.executable, "-m", module, *overrides] for module in ("train.teacher_cache", "train")), evaluate]


@functools.cache
def _preset_stages() -> tuple[str, ...]:
    from train.config import compose_config

    return tuple(compose_config([f"conf={PRESET}"]).stages)


def main_stages_needed(name: str, row: Row, main_in_run: bool) -> set[str]:
    """Stages of the main row that must be finished before `name` starts. With main training in the same call,
    every row also waits for main's ILD: the tokenized data is cached by then, and main has the GPU to itself for
    its start."""
    if name == "main":
        return set()
    return set(row.reuse) | ({"select"} if row.fixed_map else set()) | ({"ild"} if main_in_run else set())


@dataclass
class _Running:
    commands: list[list[str]]  # the ones still to run after `process`
    process: subprocess.Popen
    handle: Any  # the row's train.log, appended by every command
    signalled: float | None = None  # when the deadline's SIGTERM went out


def run_rows(names: list[str], args, budget: Budget, out: Path, deadline: float, on_exit) -> None:
    """Train and evaluate the rows, up to `args.parallel` at a time on the one GPU. A row starts as soon as the
    main-row stages it reuses are finished (so the ablation rows use the GPU beside main's KD). At the deadline
    every running process gets SIGTERM (the trainer checkpoints; the same command resumes it), and nothing new
    starts. `on_exit(name, code, why)` is called once per row: code 0 when trained and evaluated, else the failing
    command's exit code, or None with the reason the row did not start. If anything here fails, the rows' processes
    are stopped with it (none is left training unwatched past the deadline)."""
    names = list(dict.fromkeys(names))
    main_dir = out / "rows" / "main"
    main_in_run = "main" in names and not (main_dir / "heldout_eval.json").exists()
    for name in names:
        if not main_in_run and not all((main_dir / s / "done.json").exists() for s in main_stages_needed(
                name, ROWS[name], False)):  # fmt: skip
            raise RuntimeError(f"row {name!r} reuses stages of the main row: run the main row first")
    pending, running = sorted(names, key=lambda n: n != "main"), {}  # main first: the others wait for it
    for name in list(pending):  # trained and evaluated by an earlier call: recorded again, nothing to run
        if (out / "rows" / name / "heldout_eval.json").exists():
            pending.remove(name)
            on_exit(name, 0)

    def start(name: str, commands: list[list[str]], handle) -> None:
        command, *rest = commands
        try:
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
        except BaseException:
            handle.close()
            raise
        running[name] = _Running(rest, process, handle)

    try:
        while pending or running:
            if time.monotonic() > deadline:  # nothing new starts after the deadline
                for name in pending:
                    on_exit(name, None, "not started before the deadline: rerun the same command")
                pending.clear()
            main_active = "main" in pending or "main" in running
            for name in list(pending):
                if len(running) >= args.parallel:
                    break
                row, folder = ROWS[name], out / "rows" / name
                needed = main_stages_needed(name, row, main_in_run)
                if not all((main_dir / stage / "done.json").exists() for stage in needed):
                    if main_active:
                        continue  # waits for main
                    pending.remove(name)
                    on_exit(name, None, "not started: the main row stopped before the stages this row reuses")
                    continue
                pending.remove(name)
                for stage in row.reuse:
                    _reuse_stage(main_dir / stage, folder / stage)
                commands = row_command(name, row, args, budget, out, _selected_map(main_dir))
                if _finished(folder):  # an earlier call trained it: only its evaluation is left
                    commands = commands[-1:]
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "command.txt").write_text("\n".join(shlex.join(c) for c in commands) + "\n")
                ild_steps, kd_steps = budget.steps(name, row)  # what it trains with, for a later call's record
                (folder / "budget.json").write_text(json.dumps({"ild_steps": ild_steps, "kd_steps": kd_steps}))
                log.info("row %s: start", name)
                start(name, commands, open(folder / "train.log", "a"))  # noqa: SIM115 (closed when the row ends)
            time.sleep(1)
            for name, job in list(running.items()):
                now = time.monotonic()
                if job.process.poll() is None:
                    if now > deadline and job.signalled is None:
                        log.info("row %s: deadline, SIGTERM (a trainer checkpoints; rerun to resume)", name)
                        job.process.send_signal(signal.SIGTERM)
                        job.signalled = now
                    elif job.signalled is not None and now > job.signalled + 150:
                        job.process.kill()
                    continue
                code = job.process.returncode
                del running[name]
                if code == 0 and job.commands and job.signalled is None and now <= deadline:
                    start(name, job.commands, job.handle)  # the chain's next command, only before the deadline
                    continue
                job.handle.close()
                code = 0 if code == 0 and not job.commands else (code or -15)
                log.info("row %s: exit %d", name, code)
                on_exit(name, code)
    finally:
        _stop_all(running)


def _stop_all(running: dict[str, _Running]) -> None:
    """SIGTERM what still runs (a trainer checkpoints), kill what outlives 150 s, close the logs."""
    for job in running.values():
        if job.process.poll() is None:
            job.process.send_signal(signal.SIGTERM)
    for name, job in running.items():
        try:
            job.process.wait(timeout=150)
        except subprocess.TimeoutExpired:
            job.process.kill()
        job.handle.close()
        log.info("row %s: stopped with the runner", name)


def _finished(row_dir: Path) -> bool:
    report = row_dir / "report.json"
    return report.exists() and "export" in json.loads(report.read_text()).get("stage_seconds", {})


def _reuse_stage(source: Path, target: Path) -> None:
    """Copy a finished stage of the main row into another row, atomically: a copy cut short (the call's time
    limit) must not leave a stage folder that holds done.json and lacks the weights."""
    if not (source / "done.json").exists():
        raise RuntimeError(f"{source} is not finished: run the main row first")
    if target.exists():
        return
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial, ignore=shutil.ignore_patterns("checkpoints"))
    os.replace(partial, target)


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
    """Held-out packages: teacher, initialized and final student; greedy code completions and chat answers. The
    teacher's own numbers and answers are the same for every row: computed by the first row, read by the others."""
    from transformers import AutoTokenizer

    from models import HybridForCausalLM, student_cache_bytes, teacher_cache_bytes
    from models.teachers import load_teacher
    from train.pipeline import initialized_student_dir
    from train.stages.eval import Placement, heldout_agreement, heldout_loss

    cuda = torch.cuda.is_available()  # bf16 as in training on the GPU; CPU autocast to bf16 is slower than fp32
    placement = Placement(torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else None)
    teacher, spec = load_teacher(teacher_dir, dtype=placement.autocast or torch.float32, device=placement.device)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    data = row_dir.parent.parent / "data"
    loader = heldout_loader(tokenizer, files["heldout"], args.seq_len, args.eval_rows, 16, data / "cache")
    prompts = sample_prompts(tokenizer, files["heldout"], args.samples)
    initialized = initialized_student_dir(row_dir)
    final = row_dir / "student"
    start = time.perf_counter()
    result: dict[str, Any] = {}
    with placement.context():
        reference = _teacher_reference(teacher, tokenizer, loader, prompts, placement, data, args)
        result["teacher"] = {
            **reference["heldout"],
            "kv_bytes_per_token": teacher_cache_bytes(spec.num_layers, spec.num_kv_heads, spec.head_dim).per_token,
        }
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
        if "decode_tokens_per_s" in reference:
            result["teacher"]["decode_tokens_per_s"] = reference["decode_tokens_per_s"]
        if "final" in students:
            if cuda:  # a CPU's decode speed is nobody's question
                result["final"]["decode_tokens_per_s"] = decode_tokens_per_s(students["final"], tokenizer)
            answers = greedy_answers(students["final"], tokenizer, prompts)
            result["samples"] = {
                kind: [
                    {"prompt": prompt, "teacher": theirs, "student": ours}
                    for (prompt, _, _), theirs, ours in zip(
                        prompts[kind], reference["answers"][kind], answers[kind], strict=True
                    )
                ]
                for kind in prompts
            }
    return result


def _teacher_reference(teacher, tokenizer, loader, prompts, placement, data: Path, args) -> dict:
    """The teacher's held-out loss, decode tokens/s and greedy answers, cached under `data` per evaluation setting
    (every row of one --out shares the teacher and the held-out packages); written atomically."""
    from train.stages.eval import heldout_loss

    path = data / f"teacher_eval_{placement.device.type}_seq{args.seq_len}_rows{args.eval_rows}_n{args.samples}.json"
    if path.exists():
        return json.loads(path.read_text())
    reference = {"heldout": heldout_loss(teacher, loader), "answers": greedy_answers(teacher, tokenizer, prompts)}
    if placement.device.type == "cuda":
        reference["decode_tokens_per_s"] = decode_tokens_per_s(teacher, tokenizer)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # rows evaluating at once write the same content
    tmp.write_text(json.dumps(reference, indent=2))
    os.replace(tmp, path)
    return reference


def decode_tokens_per_s(model, tokenizer, batch: int = 16, prompt: int = 128, new: int = 128) -> float:
    """Greedy `generate` tokens/s at a batch of `batch` prompts of `prompt` tokens, `new` tokens each (its own
    cache: the teacher's DynamicCache, the student's HybridCache), after one warmup call; forced to full length."""
    device = next(model.parameters()).device
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


def sample_prompts(tokenizer, heldout: Path, samples: int) -> dict[str, list[tuple[str, torch.Tensor, int]]]:
    """(prompt, input ids, new tokens) for the side-by-side samples: the openings of held-out files (code
    completion) and chat prompts never trained on, rendered with the teacher's chat template."""
    import gzip

    from bench.fidelity_data import CHAT_PROMPTS

    with gzip.open(heldout, "rt") as handle:
        docs = [json.loads(line)["text"] for line, _ in zip(handle, range(400), strict=False)]
    openings = [d for d in docs if d.lstrip().startswith(("def ", "class ", '"""', "import ", "from "))]
    code = []
    for doc in openings[:: max(1, len(openings) // samples)][:samples]:
        prompt = "\n".join(doc.splitlines()[:12]) + "\n"
        code.append((prompt, tokenizer(prompt, return_tensors="pt")["input_ids"], 64))
    chat = []
    for prompt in CHAT_PROMPTS[:samples]:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        chat.append((prompt, ids, 96))
    return {"code": code, "chat": chat}


def greedy_answers(model, tokenizer, prompts: dict[str, list[tuple[str, torch.Tensor, int]]]) -> dict[str, list[str]]:
    """The model's greedy continuation of every prompt of `sample_prompts` (one at a time: no padding)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def greedy(ids: torch.Tensor, new: int) -> str:
        ids = ids.to(device)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, pad_token_id=pad
        )
        return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    return {kind: [greedy(ids, new) for _, ids, new in items] for kind, items in prompts.items()}


def row_summary(row_dir: Path) -> dict:
    """From the run itself: stage times, tokens, the pipeline's eval, the KD validation curve."""
    from train.runtime.csv_log import read_metrics

    def read_report(folder: Path) -> dict:
        return json.loads((folder / "report.json").read_text()) if (folder / "report.json").exists() else {}

    report = read_report(row_dir)
    # a stage copied from the main row (Row.reuse) trained on main's tokens: count them, as equal-token rows must
    main = read_report(row_dir.parent / "main") if row_dir.name != "main" else {}
    tokens = {}
    for stage in ("ild", "kd"):
        source = report if stage in report or not (row_dir / stage / "done.json").exists() else main
        tokens[stage] = source.get(stage, {}).get("tokens_seen", 0)
    summary = {
        "stage_seconds": report.get("stage_seconds", {}),
        "tokens": tokens,
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
    parser.add_argument("--kd-steps", type=int, default=None, help="the main row's; default: the preset's")
    parser.add_argument("--ablation-kd-steps", type=int, default=None, help="every other row's; default: --kd-steps")
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
    parser.add_argument("--evaluate-row", default=None, help=argparse.SUPPRESS)  # the row runner's last command
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every row")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.render:
        from bench.fidelity_report import render

        render(sorted(args.results_dir.glob("fidelity_smollm2_*.json")), DOC)
        return 0
    if not args.teacher:
        parser.error("--teacher is required (a .gguf file, an HF directory or a Hub id)")
    if args.evaluate_row:
        return evaluate_command(args)
    names = list(dict.fromkeys(n for n in args.rows.split(",") if n))
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"--rows: unknown {unknown}; known: {list(ROWS)}")
    if args.parallel < 1:
        parser.error(f"--parallel={args.parallel}: at least 1")
    start = time.monotonic()
    deadline = start + args.deadline_s if args.deadline_s else float("inf")
    from bench.common import environment, record
    from bench.fidelity_report import render
    from models.teachers import resolve_teacher_path
    from train.config import compose_config

    preset = compose_config([f"conf={PRESET}"])
    budget = Budget(
        args.ild_steps or preset.ild.max_steps,
        args.kd_steps or preset.kd.max_steps,
        args.ablation_kd_steps,
        list(args.overrides),
    )
    out = args.out.resolve()
    teacher_dir = resolve_teacher_path(args.teacher)
    files = prepare_data(out, teacher_dir, args, seed=preset.seed)
    budget.overrides = data_overrides(files, args.chat_weight, out / "data" / "cache") + budget.overrides
    env = environment()
    tag = args.tag or env["card"].replace("NVIDIA ", "").split()[0].lower()
    results = args.results_dir / f"fidelity_smollm2_{tag}.json"
    header = {**env, "teacher": "SmolLM2-135M-Instruct", "data": _data_summary(out / "data")}

    def on_exit(name: str, code: int | None, why: str | None = None) -> None:
        """Record the row (and re-render the page) as it ends; a row that did not start has nothing new to say, and
        what an earlier call recorded of it stays."""
        if code is None:
            log.info("row %s: %s", name, why)
            outcomes[name] = None
            return
        row_dir = out / "rows" / name
        trained = row_dir / "budget.json"  # written when the row started, possibly by an earlier call
        steps = dict(zip(("ild_steps", "kd_steps"), budget.steps(name, ROWS[name]), strict=True))
        entry = {"what": ROWS[name].what, "exit_code": code}
        entry["budget"] = json.loads(trained.read_text()) if trained.exists() else steps
        outcomes[name] = code
        entry.update(row_summary(row_dir))
        evaluated = row_dir / "heldout_eval.json"
        if code == 0 and evaluated.exists():
            entry["heldout_packages"] = json.loads(evaluated.read_text())
        else:
            trained_all = (row_dir / "export" / "done.json").exists()  # export: every row's last pipeline stage
            done = "trained; its held-out evaluation stopped" if trained_all else "stopped"
            entry["status"] = f"{done} (exit {code}); rerun the same command to resume, see {row_dir}/train.log"
        record(results, name, entry, header)
        log.info("row %s recorded in %s", name, results)
        if args.results_dir == RESULTS:
            render(sorted(RESULTS.glob("fidelity_smollm2_*.json")), DOC)

    outcomes: dict[str, int | None] = {}
    run_rows(names, args, budget, out, deadline, on_exit)
    return 0 if all(outcomes.get(name) == 0 for name in names) else 3  # 3: rows left to resume or to look at


def evaluate_command(args: argparse.Namespace) -> int:
    """`--evaluate-row NAME`: the held-out evaluation of one trained row, in its own process (the row runner's last
    command), written atomically to the row's heldout_eval.json."""
    from models.teachers import resolve_teacher_path

    out = args.out.resolve()
    row_dir = out / "rows" / args.evaluate_row
    files = {"heldout": out / "data" / "heldout.jsonl.gz"}
    result = evaluate_row(row_dir, resolve_teacher_path(args.teacher), files, args)
    tmp = row_dir / ".heldout_eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, row_dir / "heldout_eval.json")
    log.info("row %s: held-out evaluation in %.0f s", args.evaluate_row, result["eval_seconds"])
    return 0


def _data_summary(data: Path) -> dict:
    manifest = json.loads((data / "manifest.json").read_text()) if (data / "manifest.json").exists() else {}
    chats = json.loads((data / "chats_stats.json").read_text()) if (data / "chats_stats.json").exists() else {}
    return {"corpus": {k: v for k, v in manifest.items() if k != "packages"}, "chats": chats}


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    sys.exit(main())
