"""Training throughput at a preset's shapes: ILD and KD steps of the real LightningModules, and a plain teacher
training step (CE) as the in-run baseline, with random weights and synthetic packed documents.

    python -m bench.train --preset zebra_1b --stages teacher_ce,kd,ild --breakdown --max-batch
    python -m bench.train --preset zebra_1b --stages kd --devices 2 --strategy deepspeed_zero2
    python -m bench.train --preset zebra_1b --stages kd --teacher llama_3_1_8b      # the 8B KD teacher
    python -m bench.train --preset zebra_1b --stages kd_cached --teacher llama_3_1_8b   # offline KD, same student
    python -m bench.train --smoke                                                    # CPU, tiny shapes

Each measurement goes into `--out` (a JSON file shared by calls, keyed by what was measured):
- tokens/s per GPU through the Lightning Trainer (the strategy and precision users run), after warmup steps;
- model FLOPs per token (models/flops.py: student forward + backward and teacher forward, counted analytically),
  MFU against the card's bf16 matmul rate measured in the same run (8192^3), and against the spec sheet;
- peak memory; with --max-batch the largest micro-batch that fits (doubling until out of memory);
- with --breakdown a single-GPU loop over the same module pieces timed with CUDA events: data, teacher forward,
  student forward, loss, backward, optimizer; with --profile the top CUDA kernels of a few steps.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from bench.common import environment, median, record, stamp, sync
from data.batch import collate_rows
from models import HybridForCausalLM
from models.compile import set_compile
from models.documents import DOCUMENT_MASKINGS
from models.flops import attention_context, teacher_step_flops
from models.init.student_config import build_student_config
from models.kernels import limit_autotune_configs
from models.sizes import LLAMA_3_1_8B, LLAMA_3_2_1B, LLAMA_3_2_3B, TINY_LLAMA
from models.teachers import adapter_for, describe_teacher
from models.teachers.loading import resolve_attn_implementation
from train.config import StudentConfig, compose_config, student_init_kwargs, typed_config
from train.losses import ILDLossConfig, KDLossConfig
from train.runtime.deepspeed_strategy import offloads_optimizer
from train.runtime.optim import adamw_cosine
from train.runtime.sdpa_report import SDPAKernelReport
from train.runtime.teacher_cache import TeacherCache, write_shard
from train.runtime.trainer import make_strategy
from train.stages.ild import ILDModule
from train.stages.kd import KDModule

TEACHERS = {
    "llama_3_2_1b": {**LLAMA_3_2_1B, "tie_word_embeddings": True},
    "llama_3_2_3b": {**LLAMA_3_2_3B, "tie_word_embeddings": True},
    "llama_3_1_8b": {**LLAMA_3_1_8B, "tie_word_embeddings": False},
    "smoke": TINY_LLAMA,  # vocabulary: the embedded tokenizer's (bench.random_teacher)
}
PRESET_TEACHER = {"zebra_1b": "llama_3_2_1b", "zebra_1b_8mla": "llama_3_2_1b", "zebra_3b": "llama_3_2_3b"}
PRESET_TEACHER["zebra_8b"] = "llama_3_1_8b"
SMOKE_STUDENT = {
    "mla_layers": [0, 2],
    "mla": {"kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 16},
    "mamba": {"d_state": 16, "headdim": 16, "chunk_size": 16},
}
OPTIM = {"lr": 1e-5, "weight_decay": 0.0, "warmup_steps": 1, "max_steps": 10_000, "min_lr_ratio": 0.1}


# --------------------------------------------------------------------------------------------- models, data


@functools.cache
def preset_student(preset: str) -> StudentConfig:
    """The preset's `student` settings, typed as the pipeline reads them."""
    return typed_config(compose_config([f"conf={preset}"])).student


def strategy_settings(preset: str, name: str) -> dict:
    """The `strategy` config group entry `name` as the pipeline hands it to make_strategy (conf/strategy/)."""
    strategy = compose_config([f"conf={'tiny' if preset == 'smoke' else preset}", f"strategy={name}"]).strategy
    return OmegaConf.to_container(strategy, resolve=True)


def student_settings(preset: str) -> dict:
    """build_student_config keyword arguments of a preset's student (init-only keys dropped)."""
    if preset == "smoke":
        return SMOKE_STUDENT
    kwargs = student_init_kwargs(preset_student(preset))
    return {k: v for k, v in kwargs.items() if k not in ("rope_pairs", "conv_init", "mixer_init")}


def build_teacher(
    name: str, device: torch.device, dtype: torch.dtype, trainable: bool = False, masking: str = "dense"
) -> LlamaForCausalLM:
    """A random-weight Llama of a named size, built directly on the device (an 8B in fp32 on the host is slow).
    `masking` (models/documents.py DOCUMENT_MASKINGS): packed documents through SDPA's dense mask or a BlockMask."""
    attn = {"dense": "sdpa", "flex": "flex_attention"}.get(masking) or resolve_attn_implementation(masking)
    config = LlamaConfig(**TEACHERS[name], attn_implementation=attn)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.train() if trainable else model.eval().requires_grad_(False)


def build_student(
    preset: str, device: torch.device, masking: str = "dense", checkpointing: bool | None = None
) -> HybridForCausalLM:
    """The preset's student shape (from its own teacher's config), random weights, fp32 master weights, with the
    preset's activation checkpointing (student.gradient_checkpointing, as train/pipeline.py applies it) unless
    `checkpointing` says otherwise."""
    name = "smoke" if preset == "smoke" else PRESET_TEACHER[preset]
    spec = describe_teacher(LlamaConfig(**TEACHERS[name], architectures=["LlamaForCausalLM"]))
    config = build_student_config(spec, **student_settings(preset))
    config.document_masking = masking
    with torch.device(device):
        student = HybridForCausalLM(config)
    if checkpointing is None:
        checkpointing = preset != "smoke" and preset_student(preset).gradient_checkpointing
    if checkpointing:
        student.gradient_checkpointing_enable()
    return student


class SyntheticPacked(Dataset):
    """Rows of seq_len tokens packed from documents of random lengths (`doc_len` mean, at least 16), seeded per row,
    in data/batch.py's batch format. Random tokens: speed does not depend on their values."""

    def __init__(self, rows: int, seq_len: int, vocab: int, doc_len: int, seed: int = 0):
        self.rows, self.seq_len, self.vocab, self.doc_len, self.seed = rows, seq_len, vocab, doc_len, seed
        self.stream_index = False  # kd_cached: the rows carry their stream positions (the cache's key)

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        lengths, left = [], self.seq_len
        while left > 0:
            n = int(torch.empty(()).exponential_(1.0 / self.doc_len, generator=g)) + 16
            lengths.append(min(n, left))
            left -= lengths[-1]
        ids = torch.randint(0, self.vocab, (self.seq_len,), generator=g)
        row = {"input_ids": ids.tolist(), "loss_mask": [1] * self.seq_len, "doc_lens": lengths}
        return {**row, "stream_index": index} if self.stream_index else row

    def loader(self, batch_size: int, workers: int = 2) -> DataLoader:
        def collate(rows):
            return collate_rows(rows, self.seq_len, 0)

        return DataLoader(self, batch_size=batch_size, num_workers=workers, collate_fn=collate)


class TeacherCE(L.LightningModule):
    """The baseline: a plain causal-LM training step of the teacher (Hugging Face forward with labels, CE)."""

    def __init__(self, model: LlamaForCausalLM):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(**adapter_for(self.model).forward_inputs(self.model, batch), labels=batch["labels"]).loss

    def configure_optimizers(self) -> dict:
        return adamw_cosine(list(self.parameters()), **OPTIM, cpu_offload=offloads_optimizer(self.trainer.strategy))

    def flops_per_token(self, context: float) -> int:
        return teacher_step_flops(self.model, context)


def synthetic_teacher_cache(data: SyntheticPacked, k: int = 64, rows_per_shard: int = 32) -> TeacherCache:
    """A teacher cache of `data`'s rows in kd.teacher_cache's file format (train/runtime/teacher_cache.py): random
    top-k log-probs holding 90 % of the mass, memory-mapped shards in a temporary folder, so a kd_cached step reads
    and moves what a real cache's step does. Turns on `data.stream_index` (the cache's key). The folder is removed
    when the cache is collected (or at exit)."""
    folder = Path(tempfile.mkdtemp(prefix="bench_teacher_cache_"))
    g = torch.Generator().manual_seed(0)
    for shard in range(-(-data.rows // rows_per_shard)):
        n = min(rows_per_shard, data.rows - shard * rows_per_shard)
        logits = torch.randn(n, data.seq_len, k, generator=g).sort(-1, descending=True).values
        logp = logits.log_softmax(-1) + math.log(0.9)
        ids = torch.randint(0, data.vocab, (n, data.seq_len, k), generator=g, dtype=torch.int32)
        rest = torch.full((n, data.seq_len), math.log(0.1))
        write_shard(folder, shard, {"ids": ids.numpy(), "logp": logp.numpy(), "rest": rest.numpy()})
    data.stream_index = True
    cache = TeacherCache(folder, {"positions": data.rows, "rows_per_shard": rows_per_shard, "k": k})
    # the folder lives as long as the cache (a benchmark makes one per kd_cached case: MBs each, left in /tmp)
    weakref.finalize(cache, shutil.rmtree, folder, ignore_errors=True)
    return cache


def make_module(
    stage: str,
    preset: str,
    teacher_name: str,
    device: torch.device,
    kd_triton: bool = True,
    masking: str = "dense",
    data: SyntheticPacked | None = None,
    checkpointing: bool | None = None,
) -> L.LightningModule:
    if stage == "kd_cached":  # offline KD: no teacher at all, the top-k read from a cache of `data`'s rows
        student = build_student(preset, device, masking, checkpointing)
        return KDModule(student, None, OPTIM, KDLossConfig(chunk_tokens=4096), synthetic_teacher_cache(data))
    if stage == "teacher_ce":
        return TeacherCE(build_teacher(teacher_name, device, torch.float32, trainable=True, masking=masking))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = build_teacher(teacher_name, device, dtype, masking=masking)
    student = build_student(preset, device, masking, checkpointing)
    if stage == "kd":
        return KDModule(student, teacher, OPTIM, KDLossConfig(chunk_tokens=4096, use_triton=kd_triton))
    if stage == "ild":
        return ILDModule({"assigned": student}, teacher, OPTIM, ILDLossConfig(loss="l2"))
    raise ValueError(f"stage={stage!r} is invalid: teacher_ce, kd, kd_cached or ild")


# ------------------------------------------------------------------------------------------------ timing


class StepTimer(L.Callback):
    """Wall time of every optimizer step after warmup (synchronized): the sum over its accumulated micro-batches,
    each one's optimizer step included; the data wait before each micro-batch; peak memory after warmup."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.by_step: dict[int, float] = {}  # optimizer step -> seconds of its micro-batches
        self.data: list[float] = []
        self._start = self._end = None
        self._step = 0

    @property
    def steps(self) -> list[float]:
        return list(self.by_step.values())

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        sync()
        now = time.perf_counter()
        self._step = trainer.global_step  # the same for every micro-batch of one optimizer step
        if self._step == self.warmup and torch.cuda.is_available() and self._step not in self.by_step:
            torch.cuda.reset_peak_memory_stats()
        if self._end is not None and self._step >= self.warmup:
            self.data.append(now - self._end)
        self._start = now

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        sync()
        self._end = time.perf_counter()
        if self._step >= self.warmup:
            self.by_step[self._step] = self.by_step.get(self._step, 0.0) + self._end - self._start
        if trainer.is_global_zero:  # progress with a clock: a run cut short by a time limit still says where
            print(f"[{stamp()}] step {self._step} batch {batch_idx}: {self._end - self._start:.2f} s", flush=True)


def mean_context(data: SyntheticPacked, batch_size: int) -> float:
    batch = next(iter(data.loader(batch_size, workers=0)))
    return attention_context(batch["position_ids"])


def trainer_run(args, stage: str, data: SyntheticPacked) -> dict | None:
    """Steps through the Lightning Trainer; the result on rank 0 (None elsewhere)."""
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else None
    device = device or torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if args.memory_cap_gib:  # hold a larger card to a smaller one's memory (e.g. an H200 to 80 GB)
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total), device)
    print(f"[{stamp()}] building {stage} models", flush=True)
    module = make_module(
        stage, args.preset, args.teacher, device, not args.kd_torch, args.masking, data, args.gradient_checkpointing
    )
    print(f"[{stamp()}] built; Trainer starts", flush=True)
    timer = StepTimer(args.warmup)
    kernels = SDPAKernelReport()  # which SDPA kernels a step runs: a math fallback shows up in the results
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=args.devices,
        strategy=make_strategy(args.strategy_settings),
        accumulate_grad_batches=args.accumulate,
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        callbacks=[timer, kernels],
    )
    trainer.fit(module, data.loader(args.micro_batch))
    if trainer.global_rank != 0:
        return None
    step = median(timer.steps)
    tokens = args.micro_batch * args.seq * args.accumulate  # per optimizer step and GPU
    context = mean_context(data, args.micro_batch)
    flops = module.flops_per_token(context)
    result = {
        "stage": stage,
        "strategy": args.strategy,
        "devices": trainer.world_size,
        "micro_batch": args.micro_batch,
        "accumulate_grad_batches": args.accumulate,
        "memory_cap_gib": args.memory_cap_gib,
        "seq_len": args.seq,
        "document_masking": args.masking,
        "gradient_checkpointing": args.gradient_checkpointing,
        "teacher": args.teacher,
        "step_ms": 1e3 * step,
        "data_wait_ms": 1e3 * median(timer.data),
        "tokens_per_s_per_gpu": tokens / step,
        "flops_per_token": flops,
        "mean_attention_context": context,
        "achieved_tflops_per_gpu": flops * tokens / step / 1e12,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "steps_timed": len(timer.steps),
        "sdpa_kernels_per_step": kernels.kernels,
    }
    return result


def breakdown(args, stage: str, data: SyntheticPacked, profile: bool, module: L.LightningModule | None = None) -> dict:
    """One GPU, the module's pieces in a plain loop (bf16 autocast, AdamW as in training), timed with CUDA events."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = module or make_module(stage, args.preset, args.teacher, device, not args.kd_torch, args.masking)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = adamw_cosine(params, **OPTIM)["optimizer"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    batches = iter(data.loader(args.micro_batch))
    names = ["data", "teacher_forward", "student_forward", "loss", "backward", "optimizer"]

    def event():
        if device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def elapsed(a, b) -> float:
        return a.elapsed_time(b) if device.type == "cuda" else 1e3 * (b - a)

    def step() -> list:
        marks = [event()]
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        marks.append(event())
        with autocast:
            if stage == "kd":
                teacher_hidden = module.teacher_hidden(batch)
                marks.append(event())
                student_hidden = module.student_hidden(batch)
                marks.append(event())
                loss = module.loss_from_hidden(student_hidden, teacher_hidden, batch).loss
            elif stage == "ild":
                trace = adapter_for(module.teacher).capture(module.teacher, batch)
                marks.append(event())
                losses = module.losses_from_trace(trace, batch)
                marks.append(event())
                loss = torch.stack(list(losses.values())).sum()
            else:
                marks.append(event())
                inputs = adapter_for(module.model).forward_inputs(module.model, batch)
                out = module.model(**inputs, labels=batch["labels"])
                marks.append(event())
                loss = out.loss
        marks.append(event())
        loss.backward()
        marks.append(event())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(event())
        return marks

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows = [step() for _ in range(args.steps)]
    sync()
    times = {name: median([elapsed(m[i], m[i + 1]) for m in rows]) for i, name in enumerate(names)}
    result: dict[str, Any] = {"stage": stage, "phase_ms": times, "step_ms": sum(times.values())}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            sync()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
        result["profile_top_cuda"] = table.splitlines()
        print(table)
    return result


def largest_micro_batch(args, stage: str, sizes: tuple[int, ...] = (8, 12, 16, 24, 32, 48, 64)) -> dict:
    """Grow the micro-batch (one model, plain 1-GPU loop) until a step runs out of memory."""
    fits: dict[int, float | None] = {}
    module = make_module(stage, args.preset, args.teacher, torch.device("cuda"), masking=args.masking)
    for batch in sizes:
        try:
            sub = argparse.Namespace(**{**vars(args), "micro_batch": batch, "warmup": 1, "steps": 1})
            data = SyntheticPacked(4 * batch, args.seq, TEACHERS[args.teacher]["vocab_size"], args.doc_len)
            fits[batch] = breakdown(sub, stage, data, profile=False, module=module).get("peak_memory_gib")
            print(f"micro-batch {batch}: fits, peak {fits[batch]:.1f} GiB", flush=True)
        except torch.cuda.OutOfMemoryError:
            print(f"micro-batch {batch}: out of memory", flush=True)
            break
        finally:
            gc.collect()
            torch.cuda.empty_cache()
    largest = max(fits) if fits else 0
    return {"stage": stage, "largest_micro_batch": largest, "peak_memory_gib_by_micro_batch": fits}


def matmul_tflops(device: torch.device, n: int = 8192, repeat: int = 20) -> float | None:
    """The card's bf16 dense matmul rate, measured now (the practical peak MFU is reported against)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    sync()
    return 2 * n**3 * repeat / (time.perf_counter() - start) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="zebra_1b", choices=[*PRESET_TEACHER, "smoke"])
    parser.add_argument("--teacher", default=None, choices=list(TEACHERS), help="KD/ILD teacher (preset's if unset)")
    parser.add_argument("--stages", default="teacher_ce,kd,ild")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--doc-len", type=int, default=700, help="mean document length in the packed rows")
    parser.add_argument(
        "--masking",
        default=None,
        choices=list(DOCUMENT_MASKINGS),
        help="packed documents: dense masks (default), FlexAttention block masks, or auto (flex on CUDA)",
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto", help="a conf/strategy entry, e.g. deepspeed_zero2")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument(
        "--memory-cap-gib", type=float, default=None, help="cap each GPU's memory (an H200 run as an 80 GB card)"
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="student.compile (torch.compile of norms, MLP gate, Mamba2 conv); default: the preset's",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="student.gradient_checkpointing (recompute each block in backward); default: the preset's",
    )
    parser.add_argument(
        "--light-autotune", action="store_true", help="2 autotune configs per mamba-ssm kernel (fresh machines)"
    )
    parser.add_argument("--kd-torch", action="store_true", help="KD loss through torch ops, not the Triton kernel")
    parser.add_argument("--breakdown", action="store_true", help="also time the phases in a plain 1-GPU loop")
    parser.add_argument("--profile", action="store_true", help="with --breakdown: top CUDA kernels")
    parser.add_argument("--max-batch", action="store_true", help="search the largest micro-batch (1 GPU)")
    parser.add_argument("--skip-trainer", action="store_true", help="only the 1-GPU loop measurements")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks the harness")
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/train_<preset>.json)")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.teacher, args.seq, args.micro_batch = "smoke", "smoke", 128, 2
        args.steps, args.warmup, args.doc_len = min(args.steps, 3), 1, 40
    args.teacher = args.teacher or PRESET_TEACHER[args.preset]
    if "kd_cached" in args.stages.split(",") and (args.breakdown or args.max_batch):
        parser.error("--stages kd_cached runs through the Trainer only: drop --breakdown / --max-batch")
    args.strategy_settings = strategy_settings(args.preset, args.strategy)  # an unknown name fails here, first
    out = Path(args.out or f"bench/results/train_{args.preset}.json")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank_zero = int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("RANK", 0)) == 0
    header = environment()
    if rank_zero and args.devices == 1:
        header["matmul_bf16_tflops"] = matmul_tflops(device)
    data = SyntheticPacked(
        # + 3 profiled steps and spare
        max(64, (args.warmup + args.steps + 5) * args.micro_batch * args.devices * args.accumulate),
        args.seq,
        TEACHERS[args.teacher]["vocab_size"],
        args.doc_len,
    )
    if args.compile is None:
        args.compile = args.preset != "smoke" and preset_student(args.preset).compile
    set_compile(args.compile)
    if args.light_autotune:
        print(f"light autotuning: {limit_autotune_configs(keep=2)} mamba-ssm and fla configs left out", flush=True)
    suffix = f"{args.teacher}/mb{args.micro_batch}" + (f"x{args.accumulate}" if args.accumulate > 1 else "")
    suffix += "/kd_torch" if args.kd_torch else ""
    suffix += "/compiled" if args.compile else ""
    suffix += "/light_autotune" if args.light_autotune else ""
    suffix += {True: "/checkpointing", False: "/no_checkpointing", None: ""}[args.gradient_checkpointing]
    if args.seq > 2048 or args.masking is not None:  # long-context rows (keys of earlier 2K results unchanged)
        suffix += f"/seq{args.seq}/doc{args.doc_len}/{args.masking or 'dense'}"
    args.masking = args.masking or "dense"
    for stage in args.stages.split(","):
        if not args.skip_trainer:
            result = trainer_run(args, stage, data)
            if result is not None and rank_zero:
                peak = json.loads(out.read_text()).get("matmul_bf16_tflops") if out.exists() else None
                peak = header.get("matmul_bf16_tflops") or peak
                if peak:
                    result["mfu_vs_measured_matmul"] = result["achieved_tflops_per_gpu"] / peak
                spec = 989.0 if "H100" in header["card"] or "H200" in header["card"] else None
                if spec:
                    result["mfu_vs_spec_989"] = result["achieved_tflops_per_gpu"] / spec
                print(json.dumps(result, indent=2))
                record(out, f"{stage}/{args.strategy}/{result['devices']}x/{suffix}", result, header)
        if rank_zero and args.devices == 1 and args.breakdown:
            result = breakdown(args, stage, data, args.profile)
            print(json.dumps({k: v for k, v in result.items() if k != "profile_top_cuda"}, indent=2))
            record(out, f"breakdown/{stage}/{suffix}", result, header)
        if rank_zero and args.devices == 1 and args.max_batch and device.type == "cuda":
            result = largest_micro_batch(args, stage)
            print(json.dumps(result, indent=2))
            record(out, f"max_batch/{stage}/{args.teacher}/seq{args.seq}", result, header)
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None


if __name__ == "__main__":
    main()
