"""The memory pre-flight: will ILD and KD fit one GPU with this preset, strategy, micro-batch and teacher setup?

Estimated before any weights load (the models are built on the meta device, from the teachers' config.json), per
GPU and per training stage, the peak during the backward pass:

- student: weights, gradients and AdamW state (fp32 master weights and two moments) by precision, sharded by
  DeepSpeed's ZeRO stage (1: optimizer state, 2: + gradients, 3: + weights) or moved to the host by its offload
  options; ILD trains the mixers only (ild.trainable=mixers); plus DeepSpeed's communication buckets;
- the frozen teacher of the stage (replicated on every GPU, or with `teacher.shard` 1/N of it plus its largest
  matrix gathered whole): `teacher.*` in ILD, the KD teacher in KD;
- activations of one micro-batch: per layer and token, what the backward keeps (ACT_HIDDEN hidden-size and
  ACT_MLP intermediate-size tensors, fitted below), all layers without gradient checkpointing, the layer inputs plus
  one layer's recompute with it; ILD adds the teacher's per-layer trace; KD adds the chunked loss's logits
  (kd.chunk_tokens rows of the vocabulary) and its fp32 lm_head gradient.

Calibrated against the peaks measured on the GPUs (docs/performance.md, bench/results/): the estimate is meant to
be above them by at most ~20 % (conservative rather than optimistic); tests/train/test_memory_preflight.py holds it.
It runs on CUDA runs (capacity: the device's own memory) and wherever `trainer.device_memory_gib` is given (planning
on a machine without the GPU); when a stage cannot fit it stops with one line naming the settings to change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from models.teachers import TeacherSpec
from train.config import ConfigError, TrainConfig
from train.runtime.cluster import world_size

log = logging.getLogger(__name__)

GIB = 2**30
# Saved activations of one student layer per token, in elements of the training precision: the layer's input and
# normed input, the mixer's projections, the MLP's input, gate, up and product. Fitted to the measured peaks (the
# compiled student, whose fused norms and gate keep fewer fp32 copies); eager steps keep more (EAGER_FACTOR:
# zebra_1b's plain-loop KD step peaked at 52.9 GiB compiled vs 64.0 eager, i.e. 1.43x its activations).
ACT_HIDDEN = 12
ACT_MLP = 4
ACT_MLP_FROZEN = 3  # ILD with frozen MLP weights: their inputs are not kept for weight gradients
EAGER_FACTOR = 1.45
TRACE_TENSORS = 3  # ILD: the teacher's input, mixer output and output per layer, kept for the whole step
RESERVED_GIB = 1.5  # CUDA context, allocator fragmentation and NCCL buffers, not in max_memory_allocated
HALF = ("bf16-mixed", "bf16-true", "bf16", "16-mixed", "16-true", "16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class MemoryEstimate:
    stage: str
    terms: dict[str, float] = field(default_factory=dict)  # bytes per GPU, by what holds them

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    def biggest(self, n: int = 3) -> str:
        top = sorted(self.terms.items(), key=lambda kv: -kv[1])[:n]
        return ", ".join(f"{name} {value / GIB:.1f}" for name, value in top)


def teacher_params(spec: TeacherSpec) -> int:
    """Parameters of a GQA teacher from its shapes: embeddings, per layer q/k/v/o, SwiGLU MLP and two norms, the final
    norm and an untied lm_head."""
    h, hd = spec.hidden_size, spec.head_dim
    attention = h * hd * (2 * spec.num_heads + 2 * spec.num_kv_heads)
    attention += (spec.num_heads + 2 * spec.num_kv_heads) * hd if spec.qkv_bias else 0
    layer = attention + 3 * h * spec.intermediate_size + 2 * h
    head = 0 if spec.tie_word_embeddings else spec.vocab_size * h
    return spec.vocab_size * h + spec.num_layers * layer + h + head


def _students(cfg: TrainConfig, spec: TeacherSpec, stage: str) -> list[Any]:
    """The stage's students, built on the meta device: the assigned map, or one candidate per kind of MLA and
    select.fill_kinds (ILD when select chooses the map); `smart` maps are sized as the larger of all-MLA and
    all-Mamba2."""
    from models import HybridForCausalLM
    from models.init.student_config import build_student_config
    from models.mixers import candidate_kinds
    from train.config import student_init_kwargs

    # train/stages/init.py's wants_candidates (runtime reads no stage code): ILD aligns one candidate per kind.
    candidates = cfg.ild.candidates == "both" or (cfg.ild.candidates == "auto" and "select" in cfg.stages)
    kwargs = student_init_kwargs(cfg.student)
    for init_only in ("rope_pairs", "conv_init", "mixer_init"):
        kwargs.pop(init_only)
    if stage == "ild" and candidates:
        kinds = candidate_kinds(cfg.select.fill_kinds)  # MLA and every select.fill_kinds kind, as ILD builds them
        maps = [{"mla_layers": None, "mixer_types": [kind] * spec.num_layers} for kind in kinds]
    elif kwargs["mla_layers"] == "smart":
        maps = [{"mla_layers": "all"}, {"mla_layers": "none"}]
    else:
        maps = [{}]
    with torch.device("meta"):
        models = [HybridForCausalLM(build_student_config(spec, **{**kwargs, **m})) for m in maps]
    if stage == "ild" and candidates:
        return models
    return [max(models, key=lambda m: sum(p.numel() for p in m.parameters()))]


def estimate_stage(
    cfg: TrainConfig, stage: str, spec: TeacherSpec, kd_spec: TeacherSpec | None = None
) -> MemoryEstimate:
    """Peak bytes per GPU of training stage `stage` ("ild" or "kd"); `spec`: `teacher.*`, `kd_spec`: the separate KD
    teacher's (None: `teacher.*` is the KD teacher)."""
    from train.runtime.teachers import kd_teacher_dtype

    t, st = cfg.trainer, cfg.strategy
    half = str(t.precision) in HALF
    deepspeed = str(st.name).startswith("deepspeed")
    zero = st.stage if deepspeed else 0
    n = world_size(cfg)
    students = _students(cfg, spec, stage)
    total = sum(p.numel() for m in students for p in m.parameters())
    if stage == "ild" and cfg.ild.trainable == "mixers":
        trained = sum(p.numel() for m in students for layer in m.model.layers for p in layer.mixer.parameters())
    else:
        trained = total
    # DeepSpeed holds bf16 weights and gradients beside fp32 master weights; Lightning's own strategies hold fp32
    # weights and gradients, and autocast caches a bf16 copy of each weight during the step.
    weight_b = 2 if half and deepspeed else 4
    if deepspeed:  # sharded by the ZeRO stage, or in host memory with its offload options
        weights = 0.0 if st.offload_parameters else total * weight_b / (n if zero == 3 else 1)
        state = 0.0 if st.offload_optimizer else trained * (12 if half else 8) / (n if zero >= 1 else 1)
    else:
        weights, state = total * (weight_b + (2 if half else 0)), trained * 8.0
    terms = {
        "student weights": weights,
        "student gradients": trained * weight_b / (n if zero >= 2 else 1),
        "optimizer state": state,
    }
    if deepspeed:
        terms["ZeRO buffers"] = (st.reduce_bucket_size + st.allgather_bucket_size) * weight_b
        if zero == 3:  # gathered for compute: the largest tensor (embeddings / lm_head, one at a time)
            terms["ZeRO buffers"] += max(p.numel() for m in students for p in m.parameters()) * weight_b
    separate = stage == "kd" and kd_spec is not None
    teacher = kd_spec if separate else spec
    dtype = kd_teacher_dtype(cfg) if separate else cfg.teacher.dtype
    teacher_bytes = teacher_params(teacher) * DTYPE_BYTES[dtype]
    if cfg.teacher.shard:  # ZeRO-3 slices (train/runtime/sharded_teacher.py) plus the largest tensor gathered whole:
        # the embedding / lm_head matrix (the KD loss gathers the head; per-layer gathers are smaller)
        teacher_bytes = teacher_bytes / n + teacher.vocab_size * teacher.hidden_size * DTYPE_BYTES[dtype]
    terms["teacher" if not separate else "KD teacher"] = teacher_bytes
    terms["activations"] = _activations(cfg, stage, students, teacher, half)
    if stage == "kd":
        terms["KD loss"] = _kd_loss_bytes(cfg, students[0].config, teacher)
    return MemoryEstimate(stage, terms)


def _activations(cfg: TrainConfig, stage: str, students: list[Any], teacher: TeacherSpec, half: bool) -> float:
    c = students[0].config
    tokens = cfg.data.micro_batch_size * cfg.data.seq_len
    element = 2 if half else 4
    mlp = ACT_MLP_FROZEN if stage == "ild" and cfg.ild.trainable == "mixers" else ACT_MLP
    layer = (ACT_HIDDEN * c.hidden_size + mlp * c.intermediate_size) * element * tokens
    if not cfg.student.compile:
        layer *= EAGER_FACTOR
    layers = c.num_hidden_layers
    if stage == "ild":
        trace = TRACE_TENSORS * teacher.hidden_size * layers * tokens * DTYPE_BYTES[cfg.teacher.dtype]
        return layer * layers * len(students) + trace
    if cfg.student.gradient_checkpointing:  # each layer's input kept, one layer's activations rebuilt at a time
        return layers * c.hidden_size * element * tokens + layer
    return layers * layer


def _kd_loss_bytes(cfg: TrainConfig, c: Any, teacher: TeacherSpec) -> float:
    """Two (chunk, V) logit tensors in the training dtype with the fused kernel (3-5 fp32 ones on the torch path)
    and the fp32 (V, D) lm_head gradient accumulator."""
    kd = cfg.kd
    tokens = cfg.data.micro_batch_size * cfg.data.seq_len
    chunk, vocab = min(kd.chunk_tokens, tokens), max(c.vocab_size, teacher.vocab_size)
    fused = kd.use_triton and cfg.trainer.accelerator != "cpu"
    tensors = 2 * 2 if fused else 4 * (3 + (kd.resolved_divergence == "jsd") + (kd.ce_weight > 0))
    return chunk * vocab * tensors + c.vocab_size * c.hidden_size * 4


def device_capacity_gib(cfg: TrainConfig) -> float | None:
    """trainer.device_memory_gib, else the CUDA device's memory on GPU runs, else None (no pre-flight)."""
    if cfg.trainer.device_memory_gib is not None:
        return float(cfg.trainer.device_memory_gib)
    if str(cfg.trainer.accelerator) == "cpu" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB


def preflight(
    cfg: TrainConfig, spec: TeacherSpec, kd_spec: TeacherSpec | None, capacity_gib: float
) -> list[MemoryEstimate]:
    """The estimates of the run's training stages (ILD, KD); ConfigError, one line, for the first that cannot fit."""
    estimates = [estimate_stage(cfg, s, spec, kd_spec) for s in ("ild", "kd") if s in cfg.stages]
    budget = capacity_gib - RESERVED_GIB
    for e in estimates:
        log.info("memory pre-flight: %s needs ~%.1f GiB per GPU of %.1f (%s)", e.stage, e.total / GIB, capacity_gib,
                 e.biggest())  # fmt: skip
        if e.total / GIB > budget:
            raise ConfigError(
                f"memory pre-flight: stage {e.stage} needs ~{e.total / GIB:.1f} GiB per GPU, more than the "
                f"{capacity_gib:.1f} GiB of one GPU less {RESERVED_GIB} reserved (GiB: {e.biggest()}); change "
                f"{_advice(cfg, e)}, or trainer.device_memory_gib if the GPU has more"
            )
    return estimates


def _advice(cfg: TrainConfig, e: MemoryEstimate) -> str:
    """The settings that shrink the biggest terms, in the order most worth trying."""
    st, tips = cfg.strategy, []
    state = e.terms["optimizer state"] + e.terms["student gradients"] + e.terms.get("student weights", 0.0)
    if state > e.terms["activations"]:
        if not str(st.name).startswith("deepspeed") or st.stage < 3:
            tips.append(f"strategy={cfg.strategy.name} -> deepspeed_zero3 (more GPUs shard more)")
        if not getattr(st, "offload_optimizer", False):
            tips.append("strategy=deepspeed_zero3_offload_optimizer (optimizer state in host memory)")
    teacher = e.terms.get("teacher", 0.0) + e.terms.get("KD teacher", 0.0)
    if not cfg.teacher.shard and world_size(cfg) > 1 and teacher > e.terms["activations"]:
        tips.append("teacher.shard=true with a deepspeed_zero3 strategy (the teacher split over the GPUs)")
    if e.stage == "kd" and not cfg.student.gradient_checkpointing:
        tips.append("student.gradient_checkpointing=true")
    if cfg.data.micro_batch_size > 1:
        tips.append(
            f"data.micro_batch_size={cfg.data.micro_batch_size} -> {cfg.data.micro_batch_size // 2} "
            "(with trainer.accumulate_grad_batches doubled for the same batch)"
        )
    if e.stage == "kd" and cfg.kd.teacher_name_or_path is not None:
        tips.append("kd.teacher_dtype=bfloat16 or a smaller kd.teacher_name_or_path")
    return "; ".join(tips) or "trainer.devices (more GPUs)"


def check_memory(cfg: TrainConfig) -> list[MemoryEstimate] | None:
    """The pre-flight of a run (pipeline.run, before any weights load): None when there is no capacity to check."""
    capacity = device_capacity_gib(cfg)
    if capacity is None or not any(s in cfg.stages for s in ("ild", "kd")):
        return None
    from train.config import teacher_spec
    from train.config.schema import RopeScalingConfig
    from train.runtime.teachers import separate_kd_teacher

    spec = teacher_spec(cfg.teacher, fetch=True, data_seq_len=cfg.data.seq_len)
    kd_spec = None
    if separate_kd_teacher(cfg):
        from dataclasses import replace

        kd_spec = teacher_spec(
            replace(cfg.teacher, name_or_path=cfg.kd.teacher_name_or_path, rope_scaling=RopeScalingConfig()), fetch=True
        )
    return preflight(cfg, spec, kd_spec, capacity)
