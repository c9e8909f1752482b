"""Inference benchmark: the hybrid student against its GQA teacher on one card, random weights, bf16.

For each context length and model: the largest decode batch that fits (doubling, then bisection; a try
allocates the cache at that context and runs one decode step), prefill time at batch 1, and decode tokens/s
with peak memory over batch sizes. Before that, the cache bytes per token are measured (prefill T vs 2T
tokens) and compared with models/flops.py, and a CUDA graph replay is checked against eager decoding.

Student: preallocated HybridCache (`max_length`), absorbed MLA, mamba-ssm's Triton `selective_state_update`
on CUDA, one decode step captured in a CUDA graph. Teacher: transformers LlamaForCausalLM (sdpa) with its
StaticCache and the same manual CUDA graph, or DynamicCache in eager mode (`--teacher-cache dynamic`, and the
fallback when its graph fails). Decode timings start from a cache standing at the context length without
running that prefill (values do not change the cost); the JSON records each measurement's path.

    python -m bench.generate --preset zebra_1b              # one H100: about 5 minutes (see docs/inference.md)
    python -m bench.generate --smoke --out /tmp/gen.json    # CPU, tiny shapes, no graphs
    python -m bench.generate --plot-only bench/results/generate_zebra_1b_h100.json

Results go to bench/results/generate_<preset>_<card>.json (rewritten after every measurement, so a killed run
still leaves data) with PNG plots beside it.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import inspect
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

from models import HybridConfig, HybridForCausalLM, student_cache_bytes, teacher_cache_bytes
from models.kernels import triton_state_update
from models.mixers import mixer_map
from models.sizes import LLAMA_3_2_1B, TINY_LLAMA, ZEBRA_1B_MAMBA, ZEBRA_1B_MLA

PROCESS_START = time.perf_counter()  # the time budget counts imports and model building too
RESULTS = Path(__file__).parent / "results"
GIB = 2**30
# transformers renamed the forward argument `past_key_values` to `cache` within 5.x.
TEACHER_CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"

TINY_TRUNK = {
    **TINY_LLAMA,
    "vocab_size": 97,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,  # HybridConfig's default, as before the shared size existed
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}
PRESETS = {
    "zebra_1b": dict(
        trunk=LLAMA_3_2_1B,
        mla_layers=[0, 5, 10, 14],
        mla={**ZEBRA_1B_MLA, "q_lora_rank": 1344},
        mamba={**ZEBRA_1B_MAMBA, "layout": "gqa"},
    ),
    "smoke": dict(
        trunk=TINY_TRUNK,
        mla_layers=[0, 2],
        mla=dict(kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16),
        mamba=dict(d_state=16, headdim=16, chunk_size=8, layout="gqa"),
    ),
}


@dataclass
class Settings:
    preset: str = "zebra_1b"
    contexts: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072])
    batches: list[int] = field(default_factory=lambda: [1, 16, 64, 256])
    decode_steps: int = 32  # timed graph replays (or eager steps) per measurement
    warmup_steps: int = 3  # eager steps on a side stream before capture
    max_batch_cap: int = 16384  # the doubling search stops here ("capped" in the JSON)
    prefill_batch: int = 1
    cache_bytes_tokens: int = 512  # T of the measured cache bytes (prefill T vs 2T)
    graphs: bool = True
    teacher_cache: str = "static"  # "static" (StaticCache + CUDA graph) or "dynamic" (DynamicCache, eager)
    time_budget_s: float = 300.0  # from process start; later measurements are skipped (and listed)
    device: str = "cuda"
    dtype: str = "bfloat16"

    @property
    def room(self) -> int:
        """Cache slots past the context: warmup, two untimed replays, timed steps, margin."""
        return self.warmup_steps + self.decode_steps + 8


# --- models --------------------------------------------------------------------------------------------------


def build_models(preset: str, device: str, dtype: torch.dtype) -> tuple[HybridForCausalLM, LlamaForCausalLM]:
    """The student and the teacher of a preset with random weights, built on `device` (no CPU round trip)."""
    p = PRESETS[preset]
    trunk = {**p["trunk"], "tie_word_embeddings": True}  # as Llama-3.2-1B
    layers = trunk["num_hidden_layers"]
    mixers = mixer_map(layers, p["mla_layers"])
    student_config = HybridConfig(**trunk, mixer_types=mixers, mla=p["mla"], mamba=p["mamba"])
    teacher_config = LlamaConfig(**trunk)
    teacher_config._attn_implementation = "sdpa"
    with torch.device(device):
        student = HybridForCausalLM(student_config).to(dtype).eval()
        teacher = LlamaForCausalLM(teacher_config).to(dtype).eval()
    return student, teacher


# --- decoders: one greedy step over static buffers -----------------------------------------------------------


@dataclass
class Decoder:
    step: Callable[[], torch.Tensor]  # feeds the argmax back and advances positions; returns (B, vocab) logits
    cache_bytes: int
    state: list[torch.Tensor]  # every tensor a step mutates (snapshot / restore around a graph capture)
    path: str
    token: torch.Tensor  # (B, 1) input buffer the step reads


def _step_buffers(batch: int, context: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    positions = torch.full((batch, 1), context, dtype=torch.long, device=device)
    return token, positions


def student_decoder(
    model: HybridForCausalLM,
    batch: int,
    context: int,
    room: int,
    prompt: torch.Tensor | None = None,
    preallocate: bool = True,
) -> Decoder:
    """Preallocated HybridCache at `context` tokens: prefilled with `prompt`, or just marked full.

    `preallocate=False` gives the growing cache (eager only; the graph check's reference)."""
    cache = model.make_cache(batch, max_length=context + room if preallocate else None)
    if prompt is None:
        cache.position.fill_(context)  # slots hold zeros; decode cost does not depend on their values
        cache.seen_tokens = context
    else:
        model(prompt, cache=cache, logits_to_keep=1)
    token, positions = _step_buffers(batch, context, model.device)

    def step() -> torch.Tensor:
        logits = model(input_ids=token, position_ids=positions, cache=cache).logits[:, -1]
        token.copy_(logits.argmax(-1, keepdim=True))
        positions.add_(1)
        return logits

    state = [cache.doc_start, token, positions] + [t for lc in cache.layers for t in lc.tensors()]
    state += [cache.position] if preallocate else []
    mamba = "triton" if model.device.type == "cuda" and triton_state_update() is not None else "torch"
    kind = "static" if preallocate else "growing"
    return Decoder(step, cache.nbytes(), state, f"{kind} HybridCache, absorbed MLA, {mamba} state update", token)


def teacher_decoder(
    model: LlamaForCausalLM, batch: int, context: int, room: int, prompt: torch.Tensor | None = None
) -> Decoder:
    """transformers StaticCache at `context` tokens (its update and mask read a device counter: graph-safe)."""
    config = model.config
    cache = StaticCache(config=config, max_cache_len=context + room)
    if prompt is None:
        cache.early_initialization(batch, config.num_key_value_heads, config.head_dim, model.dtype, model.device)
        for layer in cache.layers:
            layer.cumulative_length.fill_(context)
    else:
        model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{TEACHER_CACHE_ARG: cache})
    token, positions = _step_buffers(batch, context, model.device)

    def step() -> torch.Tensor:
        out = model(input_ids=token, position_ids=positions, use_cache=True, **{TEACHER_CACHE_ARG: cache})
        logits = out.logits[:, -1]
        token.copy_(logits.argmax(-1, keepdim=True))
        positions.add_(1)
        return logits

    state = [token, positions]
    for layer in cache.layers:
        state += [layer.keys, layer.values, layer.cumulative_length]
    return Decoder(step, kv_bytes(cache), state, "StaticCache, sdpa", token)


def teacher_dynamic_decoder(
    model: LlamaForCausalLM, batch: int, context: int, room: int, prompt: torch.Tensor | None = None
) -> Decoder:
    """The standard DynamicCache (grows by torch.cat each token, so eager only)."""
    config = model.config
    cache = DynamicCache(config=config)
    if prompt is None:
        shape = (batch, config.num_key_value_heads, context, config.head_dim)
        for i in range(config.num_hidden_layers):
            zeros = torch.zeros(shape, dtype=model.dtype, device=model.device)
            cache.update(zeros, zeros.clone(), i)
    else:
        model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{TEACHER_CACHE_ARG: cache})
    token, positions = _step_buffers(batch, context, model.device)

    def step() -> torch.Tensor:
        out = model(input_ids=token, position_ids=positions, use_cache=True, **{TEACHER_CACHE_ARG: cache})
        logits = out.logits[:, -1]
        token.copy_(logits.argmax(-1, keepdim=True))
        positions.add_(1)
        return logits

    return Decoder(step, kv_bytes(cache), [], "DynamicCache, sdpa", token)


def kv_bytes(cache) -> int:
    """Bytes of a transformers cache's key and value tensors."""
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


# --- timing helpers ------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device, collect: bool = False) -> None:
    """Return cached blocks, so the next allocation (or OOM) sees the real headroom. `collect` also runs the
    garbage collector (after an exception, whose traceback frames can keep tensors alive; 0.1 s+ per call)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def capture(step: Callable[[], torch.Tensor], warmup: int) -> tuple[Callable[[], torch.Tensor], object]:
    """Warm `step` up on a side stream, capture one call in a CUDA graph; returns (replay, graph).

    The replay returns the captured output tensor, overwritten by each replay. Inputs are the step's own
    static buffers, which the graph also advances (token, positions, cache counters).
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay, graph


def prepare_run(decoder: Decoder, settings: Settings, graphs: bool) -> tuple[Callable[[], torch.Tensor], object]:
    if graphs:
        return capture(decoder.step, settings.warmup_steps)
    for _ in range(settings.warmup_steps):
        decoder.step()
    return decoder.step, None


def measure_decode(make: Callable, batch: int, context: int, settings: Settings, device, graphs: bool) -> dict:
    _free(device)
    _reset_peak(device)
    decoder = make(batch, context, settings.room)
    run, graph = prepare_run(decoder, settings, graphs)
    for _ in range(2):
        run()
    _sync(device)
    start = time.perf_counter()
    for _ in range(settings.decode_steps):
        run()
    _sync(device)
    seconds = time.perf_counter() - start
    record = dict(
        step_ms=1e3 * seconds / settings.decode_steps,
        tokens_per_s=batch * settings.decode_steps / seconds,
        peak_gib=_peak_gib(device),
        cache_gib=decoder.cache_bytes / GIB,
        path=decoder.path + (", CUDA graph" if graphs else ", eager"),
    )
    del run, graph, decoder
    _free(device)
    return record


def fits(make: Callable, batch: int, context: int, room: int, device) -> tuple[bool, str | None]:
    """Whether a cache at `context` plus one eager decode step fit in memory at this batch."""
    decoder, failed = None, False
    try:
        decoder = make(batch, context, room)
        decoder.step()
        _sync(device)
        return True, None
    except torch.cuda.OutOfMemoryError:
        failed = True
        return False, None
    finally:
        del decoder
        _free(device, collect=failed)


def max_batch(fit: Callable[[int], tuple[bool, str | None]], cap: int) -> dict:
    """Largest batch with fit(batch) true: doubling from 1, then bisection to within ~1.5 %."""
    lo, hi, tries, batch = 0, None, 0, 1
    while batch <= cap:
        tries += 1
        if not fit(batch)[0]:
            hi = batch
            break
        lo, batch = batch, batch * 2
    if hi is None:
        return dict(batch=lo, capped=True, tries=tries)
    while hi - lo > max(1, lo // 64):
        mid = (lo + hi) // 2
        tries += 1
        if fit(mid)[0]:
            lo = mid
        else:
            hi = mid
    return dict(batch=lo, capped=False, tries=tries)


def measure_prefill(
    run: Callable[[torch.Tensor], None], batch: int, context: int, vocab: int, device, repeats: int
) -> dict:
    _free(device)
    _reset_peak(device)
    ids = torch.randint(0, vocab, (batch, context), device=device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        run(ids)
        _sync(device)
        times.append(time.perf_counter() - start)
    best = min(times)
    record = dict(ms=1e3 * best, tokens_per_s=batch * context / best, peak_gib=_peak_gib(device))
    _free(device)
    return record


# --- cache bytes and graph check -----------------------------------------------------------------------------


def measured_cache_bytes(
    student: HybridForCausalLM, teacher: LlamaForCausalLM, tokens: int, batch: int, device
) -> dict:
    """Per-token and constant cache bytes from real prefills of T and 2T tokens (growing caches)."""
    sizes = {}
    for n in (tokens, 2 * tokens):
        ids = torch.randint(0, student.config.vocab_size, (batch, n), device=device)
        with torch.no_grad():
            cache = student.make_cache(batch)
            student(ids, cache=cache, logits_to_keep=1)
            dynamic = DynamicCache(config=teacher.config)
            teacher(input_ids=ids, use_cache=True, logits_to_keep=1, **{TEACHER_CACHE_ARG: dynamic})
        sizes[n] = (cache.nbytes(), kv_bytes(dynamic))
        del cache, dynamic
    config, tc = student.config, teacher.config
    analytic = {
        "student": student_cache_bytes(config, student.dtype, torch.float32),
        "teacher": teacher_cache_bytes(tc.num_hidden_layers, tc.num_key_value_heads, tc.head_dim, teacher.dtype),
    }
    out = {"tokens": tokens, "batch": batch}
    for i, name in enumerate(("student", "teacher")):
        small, large = sizes[tokens][i], sizes[2 * tokens][i]
        per_token = (large - small) / (tokens * batch)
        out[name] = dict(
            measured_per_token=per_token,
            measured_constant=small / batch - per_token * tokens,
            analytic_per_token=analytic[name].per_token,
            analytic_constant=analytic[name].constant,
        )
    out["student_over_teacher_percent"] = dict(
        measured=100 * out["student"]["measured_per_token"] / out["teacher"]["measured_per_token"],
        analytic=100 * analytic["student"].per_token / analytic["teacher"].per_token,
    )
    return out


def graph_check(make_static: Callable, make_reference: Callable, vocab: int, settings: Settings, device) -> dict:
    """Logits of a few steps: the static decoder (graph-replayed when graphs are on) vs an eager reference.

    Both start from a real prefill of the same prompt and are fed the same tokens. Capture warmup advances the
    static cache, so its state is snapshotted after the prefill and restored before the replays.
    """
    batch, context, steps = 2, 128, 4
    prompt = torch.randint(0, vocab, (batch, context), device=device)
    tokens = torch.randint(0, vocab, (steps, batch, 1), device=device)
    graphs = settings.graphs and device.type == "cuda"
    static = make_static(batch, context, settings.room, prompt)
    snapshot = [t.clone() for t in static.state]
    run, graph = prepare_run(static, settings, graphs)
    for t, saved in zip(static.state, snapshot, strict=True):
        t.copy_(saved)
    reference = make_reference(batch, context, settings.room, prompt)
    errors = []
    for i in range(steps):
        static.token.copy_(tokens[i])
        reference.token.copy_(tokens[i])
        a, b = run().float(), reference.step().float()
        errors.append(((a - b).norm() / b.norm()).item())
    del run, graph, static, reference
    _free(device)
    return dict(max_rel_err=max(errors), steps=steps, graphs=graphs)


# --- the run -------------------------------------------------------------------------------------------------


class Recorder:
    """The results dict, rewritten to disk after every change (a killed run still leaves its data)."""

    def __init__(self, path: Path, results: dict, budget_s: float, start: float):
        self.path, self.results, self.budget_s, self.start = path, results, budget_s, start

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self, what: str) -> bool:
        if self.elapsed() <= self.budget_s:
            return False
        self.results["skipped"].append(what)
        self.save()
        return True

    def attempt(self, what: str, fn: Callable[[], dict]) -> dict | None:
        """fn() or, when it raises, None with the error string recorded (the run goes on)."""
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 -- every failure is data for the report
            self.results["errors"].append(f"{what}: {type(error).__name__}: {error}"[:2000])
            del error
            gc.collect()  # the traceback's frames held the failed measurement's tensors
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None
        finally:
            self.save()

    def save(self) -> None:
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=2))
        tmp.replace(self.path)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def card_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def card_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; anything else -> its name, lowercased, underscores."""
    match = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", name)
    return match.group(1).lower() if match else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def run(settings: Settings, out: Path | None = None, start: float | None = None) -> tuple[dict, Path]:
    """Every measurement of the benchmark; returns (results, json path). The time budget counts from `start`."""
    threads = torch.get_num_threads()
    if settings.device == "cpu":
        torch.set_num_threads(1)  # tiny CPU shapes: extra threads only add synchronization (100x on a busy host)
    try:
        return _run(settings, out, time.perf_counter() if start is None else start)
    finally:
        torch.set_num_threads(threads)


def _run(settings: Settings, out: Path | None, start: float) -> tuple[dict, Path]:
    device = torch.device(settings.device)
    dtype = getattr(torch, settings.dtype)
    torch.manual_seed(0)
    card = card_name(device)
    out = out or RESULTS / f"generate_{settings.preset}_{card_slug(card)}.json"
    graphs = settings.graphs and device.type == "cuda"
    student, teacher = build_models(settings.preset, settings.device, dtype)
    vocab = student.config.vocab_size
    teacher_make = teacher_decoder if settings.teacher_cache == "static" else teacher_dynamic_decoder
    teacher_graphs = graphs and settings.teacher_cache == "static"
    results = {
        "benchmark": "generate",
        "preset": settings.preset,
        "card": card,
        "card_memory_gib": torch.cuda.get_device_properties(device).total_memory / GIB
        if device.type == "cuda"
        else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": _version("triton"),
            "mamba_ssm": _version("mamba-ssm") or _version("mamba_ssm"),
            "transformers": _version("transformers"),
        },
        "settings": asdict(settings),
        "models": {
            "student": dict(
                params=sum(p.numel() for p in student.parameters()),
                mixers=student.config.mixer_types,
                decode="preallocated HybridCache (max_length), absorbed MLA, selective_state_update "
                + ("(mamba-ssm Triton)" if device.type == "cuda" and triton_state_update() else "(torch reference)")
                + (", CUDA graph per decode step" if graphs else ", eager"),
                prefill="preallocated HybridCache; MLA prefill in expanded form (SDPA causal), Mamba2 chunked scan",
            ),
            "teacher": dict(
                params=sum(p.numel() for p in teacher.parameters()),
                decode=(
                    "transformers StaticCache, sdpa (masked, GQA queries packed per KV head), "
                    + ("CUDA graph per decode step" if teacher_graphs else "eager")
                    if settings.teacher_cache == "static"
                    else "transformers DynamicCache, sdpa, eager (a growing cache cannot be graph-captured)"
                ),
                prefill="DynamicCache, sdpa causal",
            ),
        },
        "cache_bytes": None,
        "graph_check": {},
        "max_batch": {"student": {}, "teacher": {}},
        "prefill": [],
        "decode": [],
        "errors": [],
        "skipped": [],
        "complete": False,
    }
    rec = Recorder(out, results, settings.time_budget_s, start)
    makers = {"student": student_decoder, "teacher": teacher_make}
    models = {"student": student, "teacher": teacher}
    use_graphs = {"student": graphs, "teacher": teacher_graphs}

    def make(name: str) -> Callable:
        model, maker = models[name], makers[name]
        return lambda batch, context, room, prompt=None: maker(model, batch, context, room, prompt)

    def prefill(name: str) -> Callable[[torch.Tensor], None]:
        if name == "student":
            return lambda ids: student(ids, cache=student.make_cache(ids.shape[0], ids.shape[1] + 1), logits_to_keep=1)
        return lambda ids: teacher(
            input_ids=ids, use_cache=True, logits_to_keep=1, **{TEACHER_CACHE_ARG: DynamicCache(config=teacher.config)}
        )

    with torch.no_grad():
        results["cache_bytes"] = rec.attempt(
            "cache_bytes",
            lambda: measured_cache_bytes(student, teacher, settings.cache_bytes_tokens, 2, device),
        )
        references = {
            "student": lambda b, c, r, p: student_decoder(student, b, c, r, p, preallocate=False),
            "teacher": lambda b, c, r, p: teacher_dynamic_decoder(teacher, b, c, r, p),
        }
        for name in ("student", "teacher"):
            check_settings = Settings(**{**asdict(settings), "graphs": use_graphs[name]})
            results["graph_check"][name] = rec.attempt(
                f"graph_check {name}",
                lambda name=name, s=check_settings: graph_check(make(name), references[name], vocab, s, device),
            )
            # Kernel compilation and autotuning happen here, outside every timed region.
            rec.attempt(
                f"prefill warmup {name}",
                lambda name=name: measure_prefill(prefill(name), 1, min(settings.contexts), vocab, device, 1),
            )
        for context in settings.contexts:
            for name in ("student", "teacher"):
                if rec.over_budget(f"{name} context {context}"):
                    continue
                found = rec.attempt(
                    f"max_batch {name} {context}",
                    lambda name=name, context=context: max_batch(
                        lambda n: fits(make(name), n, context, settings.room, device), settings.max_batch_cap
                    ),
                )
                results["max_batch"][name][str(context)] = found
                measured = rec.attempt(
                    f"prefill {name} {context}",
                    lambda name=name, context=context: measure_prefill(
                        prefill(name), settings.prefill_batch, context, vocab, device, 3 if context <= 4096 else 1
                    ),
                )
                if measured is not None:
                    results["prefill"].append(
                        dict(model=name, context=context, batch=settings.prefill_batch, **measured)
                    )
                batches = [b for b in settings.batches if found is None or b <= found["batch"]]
                if found is not None and found["batch"] not in batches:
                    batches.append(found["batch"])
                for batch in batches:
                    if rec.over_budget(f"{name} context {context} batch {batch}"):
                        break
                    record = _decode_with_fallback(
                        rec, make(name), name, batch, context, settings, device, use_graphs[name]
                    )
                    if record is not None:
                        results["decode"].append(
                            dict(
                                model=name,
                                context=context,
                                batch=batch,
                                at_max_batch=batch == (found or {}).get("batch"),
                                **record,
                            )
                        )
                        rec.save()
    results["complete"] = not results["skipped"]
    rec.save()
    return results, out


def _decode_with_fallback(
    rec: Recorder, make: Callable, name: str, batch: int, context: int, settings: Settings, device, graphs: bool
) -> dict | None:
    """Decode measurement; when the CUDA graph fails (capture or its extra pool), the eager step is measured."""
    what = f"decode {name} context {context} batch {batch}"
    record = rec.attempt(what, lambda: measure_decode(make, batch, context, settings, device, graphs))
    if record is None and graphs:
        record = rec.attempt(what + " (eager)", lambda: measure_decode(make, batch, context, settings, device, False))
        if record is not None:
            record["graph_failed"] = True
    return record


def smoke_settings() -> Settings:
    """CPU, tiny shapes: every code path of the benchmark in a few seconds."""
    return Settings(
        preset="smoke",
        contexts=[64, 128],
        batches=[1, 2],
        decode_steps=2,
        warmup_steps=1,
        max_batch_cap=4,
        cache_bytes_tokens=16,
        graphs=False,
        time_budget_s=120.0,
        device="cpu",
        dtype="float32",
    )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="zebra_1b", choices=sorted(PRESETS))
    parser.add_argument("--contexts", type=_ints)
    parser.add_argument("--batches", type=_ints)
    parser.add_argument("--decode-steps", type=int)
    parser.add_argument("--max-batch-cap", type=int)
    parser.add_argument("--time-budget", type=float, help="seconds; later measurements are skipped")
    parser.add_argument("--teacher-cache", choices=["static", "dynamic"])
    parser.add_argument("--no-graphs", action="store_true", help="eager decode steps for both models")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny config, contexts 64/128, batch 1-2")
    parser.add_argument("--out", type=Path, help="results JSON (PNG plots are written beside it)")
    parser.add_argument("--plot-only", type=Path, metavar="JSON", help="redraw the plots of an existing result")
    args = parser.parse_args(argv)
    from bench.plots import plot_generate

    if args.plot_only:
        for path in plot_generate(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix("")):
            print(f"wrote {path}")
        return args.plot_only
    settings = smoke_settings() if args.smoke else Settings(preset=args.preset)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: use --smoke for the CPU run")
    overrides = dict(
        contexts=args.contexts,
        batches=args.batches,
        decode_steps=args.decode_steps,
        max_batch_cap=args.max_batch_cap,
        time_budget_s=args.time_budget,
        teacher_cache=args.teacher_cache,
    )
    for key, value in overrides.items():
        if value is not None:
            setattr(settings, key, value)
    if args.no_graphs:
        settings.graphs = False
    results, out = run(settings, args.out, PROCESS_START if __name__ == "__main__" else None)
    _print_summary(results)
    for path in plot_generate(results, out.with_suffix("")):
        print(f"wrote {path}")
    print(f"wrote {out}")
    return out


def _print_summary(results: dict) -> None:
    cb = results.get("cache_bytes")
    if cb:
        for name in ("student", "teacher"):
            c = cb[name]
            print(
                f"{name:8s} cache bytes/token measured {c['measured_per_token']:.0f} analytic {c['analytic_per_token']}"
                f"  constant measured {c['measured_constant']:.0f} analytic {c['analytic_constant']}"
            )
        print(f"student/teacher per token: {cb['student_over_teacher_percent']['measured']:.2f} %")
    print(f"graph check: {results['graph_check']}")
    print(f"{'model':8s} {'context':>8s} {'batch':>6s} {'tok/s':>10s} {'step ms':>8s} {'peak GiB':>9s}  path")
    for r in results["decode"]:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        row = f"{r['model']:8s} {r['context']:8d} {r['batch']:6d} {r['tokens_per_s']:10.1f} {r['step_ms']:8.2f}"
        print(f"{row} {peak:>9s}  {r['path']}")
    for name, per_context in results["max_batch"].items():
        print(f"max batch {name}: " + ", ".join(f"{c}: {v['batch'] if v else '-'}" for c, v in per_context.items()))
    for line in results["errors"]:
        print(f"ERROR {line}")
    for line in results["skipped"]:
        print(f"skipped (time budget) {line}")


if __name__ == "__main__":
    main()
