"""The typed configuration of `python -m train`: one dataclass per setting group, stored in Hydra's ConfigStore.

These are the objects the code runs on: `typed_config` (train/config/validate.py) turns the composed config into a
`TrainConfig` and the stages read it. Where a group is a component's own settings it *is* that component's
dataclass: `kd.*` is `KDLossConfig` plus the training schedule, `ild.*` is `ILDLossConfig` plus the schedule,
`student.mla.*` / `student.mamba.*` are `MLAConfig` / `MambaConfig` plus their init-only choices.

`conf/train.yaml` starts from `base_train`; the options under `conf/strategy/` and `conf/logger/` start from
`schema/<group>/<kind>`. OmegaConf rejects unknown keys (`student.mla.kv_lora_rnk=3`) and wrong types
(`ild.max_steps=abc`) while composing; `validate_config` checks the rest (train/config/validate.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from data.config import DataConfig, SourceConfig
from models import MambaConfig, MLAConfig
from models.mixer_gdn import GDNConfig
from models.mixers import FILL_KIND
from train.losses import ILDLossConfig, KDLossConfig

DTYPES = ("float32", "bfloat16", "float16")
# "auto": flex_attention where CUDA is available (packed documents without a dense mask), sdpa elsewhere.
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true", "64", "bf16", "16")
ACCELERATORS = ("cpu", "gpu", "cuda", "auto")
TINY_TEACHER = "tiny"  # teacher.name_or_path that means "train the embedded Llama of shape teacher.tiny"
TEACHER_CHOICES = "'tiny', an existing local directory, a .gguf file or a Hub id 'org/name'"


# ----------------------------------------------------------------------------------------------- teacher


@dataclass
class TinyTeacherConfig:
    """Shape and training of the embedded teacher (a Llama trained on the embedded corpus; ~1 min on 2 cores)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4  # head_dim = hidden_size / num_heads = 32
    num_kv_heads: int = 2  # GQA: two query heads share each KV head, like the real teachers
    intermediate_size: int = 384  # 3 x hidden (SwiGLU)
    train_steps: int = 300  # measured 0.25 s/step at 16 x 256 tokens on 2 CPU cores: about 75 s
    lr: float = 3e-3
    batch_size: int = 16  # packed rows per step
    seq_len: int = 256  # tokens per packed row
    # Trained teachers are kept here, keyed by their settings, and reused by later runs.
    cache_dir: str = "${output_dir}/../tiny_teacher"


@dataclass
class RopeScalingConfig:
    """`teacher.rope_scaling`: train past the teacher's max_position_embeddings, e.g. SmolLM2's 8K x 4 = 32K with
    `teacher.rope_scaling={rope_type:yarn,factor:4}`. The student inherits the scaled RoPE. rope_type null: the
    teacher's own RoPE (data.seq_len at most its max_position_embeddings)."""

    rope_type: str | None = None  # yarn | linear
    factor: float | None = None  # > 1: max_position_embeddings grows by it
    # yarn's optional knobs (transformers' names and defaults when null)
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The set keys, as transformers' rope_parameters take them; {} when no scaling is asked for."""
        return {k: v for k, v in asdict(self).items() if v is not None} if self.rope_type is not None else {}


@dataclass
class TeacherConfig:
    # "tiny" (the embedded teacher, see `tiny`), a Hub id ("meta-llama/Llama-3.2-1B-Instruct"), a local
    # directory with config.json + weights, or a llama.cpp .gguf file (or a directory holding one), dequantized
    # once into $ZEBRA_DISTILL_CACHE/gguf (models/gguf.py). Llama 3.x, Qwen2/2.5/3 and Mistral are supported.
    name_or_path: str = TINY_TEACHER
    dtype: str = "float32"  # float32 | bfloat16 | float16: the frozen teacher's weights and forward
    trust_remote_code: bool = False
    # transformers attention backend of the teacher; "auto": flex_attention on CUDA (packed documents through a block
    # mask, no quadratic mask; docs/performance.md long packed rows), sdpa on CPU and for cached decoding
    attn_implementation: str = "auto"
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    # Partition the frozen teacher's weights over the GPUs (DeepSpeed ZeRO-3, gathered per module in its forward)
    # instead of replicating it: ~1/N of its bytes per GPU, for a teacher too large to replicate. Needs a ZeRO-3
    # strategy; ILD and KD (train/runtime/sharded_teacher.py, docs/performance.md).
    shard: bool = False
    tiny: TinyTeacherConfig = field(default_factory=TinyTeacherConfig)


# ----------------------------------------------------------------------------------------------- student


@dataclass
class MLASettings(MLAConfig):
    """`student.mla`: models.config.MLAConfig (every field, same meaning) with the teacher-dependent defaults left
    open, plus two init choices. A None on qkv_bias / o_bias / qk_norm means "as the teacher has it"."""

    qkv_bias: bool | None = None  # None: the teacher's (Qwen2 has q/k/v biases)
    o_bias: bool | None = None  # None: the teacher's
    qk_norm: bool | None = None  # None: the teacher's (Qwen3 has per-head q/k RMSNorm)
    # Not MLAConfig fields: how initialization chooses ranks and RoPE pairs.
    energy: float | None = None  # e.g. 0.95: per-layer kv ranks keeping this share of squared singular values
    rope_pairs: str = "energy"  # "energy": the pairs with the most logit mass | "uniform": evenly spaced


@dataclass
class MambaSettings(MambaConfig):
    """`student.mamba`: models.config.MambaConfig (every field, same meaning) plus the conv init. Initialization
    from attention (x <- W_v, B <- W_k, C <- W_q) needs layout "gqa" and headdim = d_state = the teacher's head_dim;
    None takes those from the teacher."""

    d_state: int | None = None  # None: the teacher's head_dim
    headdim: int | None = None  # None: the teacher's head_dim
    in_proj_bias: bool | None = None  # None: with gate_init=constant (its bias) or when the teacher has q/k/v biases
    out_proj_bias: bool | None = None  # None: the teacher's o bias
    dt_limit: list[float] = field(default_factory=lambda: [0.0, math.inf])  # clamp of softplus(dt)
    A_init_range: list[float] = field(default_factory=lambda: [1.0, 16.0])
    conv_init: str = "identity"  # not a MambaConfig field: "identity" (newest input passes) | "random"


@dataclass
class GDNSettings(GDNConfig):
    """`student.gdn`: models.mixer_gdn.GDNConfig (every field, same meaning). Initialization from attention
    (q <- W_q, k <- W_k, v <- W_v) needs head_k_dim = head_v_dim = the teacher's head_dim; None takes those and the
    biases from the teacher. Placed by `student.layers` ({3: gdn})."""

    head_k_dim: int | None = None  # None: the teacher's head_dim
    head_v_dim: int | None = None  # None: the teacher's head_dim
    qkv_bias: bool | None = None  # None: the teacher's q/k/v bias
    o_bias: bool | None = None  # None: the teacher's o bias


@dataclass
class StudentConfig:
    # Which layers become MLA: a list of indices, "all" or "none"; every other layer is Mamba2. With the
    # `select` stage, the list's length is the number of MLA layers SMART places (unless select says).
    mla_layers: Any = "all"  # or "smart": the select stage chooses (needs num_mla_layers or kv_budget)
    num_mla_layers: int | None = None  # with mla_layers=smart: how many MLA layers SMART places
    kv_budget: float | None = None  # with mla_layers=smart: KV cache per token as a fraction of the teacher's
    # The general layer map, instead of mla_layers: one mixer kind per teacher layer ([mla, mamba, ...]) or a map
    # {layer: kind} whose other layers are Mamba2 ({0: mla, 15: mla}); kinds: models/mixers.py (MIXERS).
    layers: Any = None
    mla: MLASettings = field(default_factory=MLASettings)
    mamba: MambaSettings = field(default_factory=MambaSettings)
    gdn: GDNSettings = field(default_factory=GDNSettings)
    gradient_checkpointing: bool = False  # recompute each student block in backward (memory for compute)
    # "attention": MLA by SVD of the teacher's attention, Mamba2 from its Q/K/V/O (the recipe); "random": mixers
    # from the model's own initializer, MLPs / norms / embeddings still copied (the ablation baseline)
    mixer_init: str = "attention"
    # With mixer_init=attention: rows of the ILD stream (data.seq_len tokens each) on which the init stage fits what
    # the teacher's weights cannot set, the output scale per channel of Mamba2 / GDN layers, to the teacher's
    # attention outputs (models/init/calibrate.py). 0: none (Zebra-Llama's init). None: 8, or 0 with teacher.shard
    # (calibration runs the whole teacher on one device).
    calibration_rows: int | None = None
    # torch.compile RMSNorm, the MLP activation and Mamba2's conv for CUDA training steps (models/compile.py)
    compile: bool = False
    # Packed documents in MLA (models/documents.py): "auto" FlexAttention block masks on CUDA, the dense (B,1,T,T)
    # mask elsewhere | "dense" always the dense mask | "flex" always block masks (CUDA for training). Applied to
    # every student a stage loads, so it is a runtime choice: changing it never redoes init.
    document_masking: str = "auto"


# --------------------------------------------------------------------------------------------- training


@dataclass
class TrainingSchedule:
    """What every training stage has: AdamW with linear warmup and cosine decay, validation and checkpoint cadence."""

    max_steps: int = 1000  # optimizer steps
    lr: float = 1e-4  # peak AdamW learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50  # linear warmup
    weight_decay: float = 0.0  # on matrices only
    val_every_n_steps: int = 200
    checkpoint_every_n_steps: int = 500

    def optimizer(self) -> dict:
        """The optimizer and schedule settings (train/runtime/optim.py)."""
        keys = ("lr", "weight_decay", "warmup_steps", "max_steps", "min_lr_ratio")
        return {k: getattr(self, k) for k in keys}


@dataclass
class ILDConfig(ILDLossConfig, TrainingSchedule):
    """Layer-wise alignment: every student layer gets the teacher's input and matches its outputs. The loss
    settings (`loss`, `output_weight`, `mixer_weight`) are train/losses/ild.py's ILDLossConfig."""

    lr: float = 1e-3
    trainable: str = "mixers"  # "mixers": only MLA / Mamba2 mixers train | "layers": mixers + MLPs + norms
    # "both": align a candidate of MLA and of every select.fill_kinds kind for every layer (what `select` needs);
    # "assigned": only the mixer of student.mla_layers; "auto": "both" when the select stage runs, else "assigned".
    candidates: str = "auto"


@dataclass
class SelectConfig:
    """SMART layer selection from the ILD losses of the candidates (MLA and every fill kind)."""

    num_mla_layers: int | None = None  # None: len(student.mla_layers) (which must then be a list)
    keep_terminal: bool = True  # force MLA at both ends of the stack (SMART: terminal layers are the most sensitive)
    rule: str = "smart"  # "smart": sensitivity-driven | "uniform": evenly spaced, ignoring the scores (a baseline)
    # Kinds a layer not made MLA may take (models/mixers.py MIXERS, e.g. [mamba, gdn]): init and ILD make one all-<kind>
    # candidate of each (and of MLA), aligned in one teacher pass; each such layer takes its lowest-ILD-loss kind.
    fill_kinds: list[str] = field(default_factory=lambda: [FILL_KIND.name])
    # None: student.kv_budget counts KV bytes per token (constant state free). T: the budget is kv_budget x the
    # teacher's KV bytes per token x T, and each layer costs per-token bytes x T + its constant (recurrent) state.
    context_tokens: int | None = None


@dataclass
class KDConfig(KDLossConfig, TrainingSchedule):
    """End-to-end distillation against the teacher's logits. The loss settings (divergence, jsd_beta,
    temperature, scale_by_t2, kl_weight, ce_weight, chunk_tokens, use_triton) are train/losses/kd.py's KDLossConfig."""

    # A separate (larger) KD teacher: a Hub id, local directory or .gguf, loaded as `teacher` is, for the kd stage
    # only (init and ILD use `teacher`), e.g. meta-llama/Llama-3.1-8B-Instruct as in Zebra-Llama. It must share the
    # data's tokenizer (checked before any weights load, train/config/tokenizers.py); where only its padded
    # embedding rows differ, KD runs on the shared vocabulary. None: `teacher`.
    teacher_name_or_path: str | None = None
    teacher_dtype: str | None = None  # float32 | bfloat16 | float16 of the KD teacher; None: teacher.dtype
    # Offline KD: a directory written by `python -m train.teacher_cache` (the KD teacher's top-k log-probs per token
    # of the KD stream, train/runtime/teacher_cache.py); kd then distills from it and loads no teacher. None: live.
    teacher_cache: str | None = None
    teacher_cache_k: int = 64  # tokens per position the cache keeps; the rest lumped (train/losses/kd_topk.py)
    teacher_cache_dtype: str = "float32"  # float32 | float16 of the stored log-probs


@dataclass
class DPOConfig(TrainingSchedule):
    """Optional preference tuning after KD."""

    max_steps: int = 500
    lr: float = 5e-7
    min_lr_ratio: float = 0.0
    beta: float = 0.01  # DPO temperature on the policy / reference log-ratio
    # Preference datasets (chosen / rejected); required when "dpo" is in stages.
    sources: list[SourceConfig] = field(default_factory=list)


@dataclass
class EvalConfig:
    max_batches: int | None = 50  # held-out batches for loss / perplexity; None: the whole eval split
    num_generations: int = 4  # sample prompts generated through the compressed cache (0: none)
    max_new_tokens: int = 32


@dataclass
class ExportConfig:
    dtype: str = "bfloat16"  # float32 | bfloat16 | float16 of the saved student weights


@dataclass
class FaultsConfig:
    """What a training stage does when its loss or gradients turn NaN / inf (docs/reliability.md)."""

    # "skip": drop that optimizer update (weights and AdamW moments untouched; the step counter and LR schedule
    # advance, as with fp16 loss scaling), at most max_skips times per stage, then stop; "stop": stop at the first.
    # Stopping writes last.ckpt (without the bad update) and exits with code 3.
    nonfinite_loss: str = "skip"
    max_skips: int = 10


# ------------------------------------------------------------------------------- trainer, strategy, logger


@dataclass
class TrainerConfig:
    """Keyword arguments of lightning.Trainer (max_steps, validation and checkpoint cadence come per stage)."""

    accelerator: str = "cpu"  # cpu | gpu | cuda | auto
    devices: Any = 1  # int, "auto" or a list of device ids (per node)
    num_nodes: int = 1
    precision: Any = "32-true"  # "32-true" | "bf16-mixed" | "16-mixed" | "bf16-true" ...
    accumulate_grad_batches: int = 1  # global batch = micro_batch_size x devices x num_nodes x this
    gradient_clip_val: float | None = 1.0  # None: no clipping
    log_every_n_steps: int = 10
    deterministic: Any = False  # true | false | "warn"
    enable_progress_bar: bool = True
    # Not a Trainer argument: the memory of one GPU in GiB for the memory pre-flight (train/runtime/
    # memory_preflight.py); None: the CUDA device's own on GPU runs, no pre-flight on CPU. Set it to plan for a
    # GPU from a machine without one, or to hold a run to less than the card has.
    device_memory_gib: float | None = None


@dataclass
class AutoStrategyConfig:
    name: str = "auto"  # Lightning picks (single device, or DDP for several)


@dataclass
class DDPStrategyConfig:
    name: str = "ddp"
    find_unused_parameters: bool = False  # every trainable parameter gets a gradient each step
    gradient_as_bucket_view: bool = True  # gradients alias the all-reduce buckets (less memory)
    static_graph: bool = False


@dataclass
class DeepSpeedStrategyConfig:
    """lightning.pytorch.strategies.DeepSpeedStrategy keyword arguments (same names)."""

    name: str = "deepspeed_zero2"
    stage: int = 2  # ZeRO stage: 2 shards optimizer state + gradients, 3 also the parameters
    offload_optimizer: bool = False  # optimizer state (and its step) on the CPU
    offload_parameters: bool = False  # stage 3 only: parameters on the CPU
    offload_optimizer_device: str = "cpu"
    offload_params_device: str = "cpu"
    pin_memory: bool = False  # pinned host buffers for offload
    allgather_bucket_size: int = 200_000_000  # elements per all-gather bucket
    reduce_bucket_size: int = 200_000_000  # elements per reduce-scatter bucket
    overlap_comm: bool = True  # overlap gradient reduction with backward
    contiguous_gradients: bool = True
    sub_group_size: int = 1_000_000_000_000  # stage 3: parameters per optimizer sub-group


STRATEGY_SCHEMAS: dict[str, type] = {
    "auto": AutoStrategyConfig,
    "ddp": DDPStrategyConfig,
    "deepspeed": DeepSpeedStrategyConfig,  # every name starting with "deepspeed"
}


@dataclass
class CSVLoggerConfig:
    kind: str = "csv"  # metrics.csv in each stage folder


@dataclass
class WandbLoggerConfig:
    """One W&B run per pipeline run (train/runtime/tracking.py).

    Its id: $WANDB_RUN_ID, else <output_dir>/.wandb_run_id."""

    kind: str = "wandb"
    project: str = "zebra-distill"
    entity: str | None = None  # team or user; None: the logged-in default
    name: str = "${run_name}"  # W&B run name
    group: str | None = None  # runs shown together (a sweep, a model size); None: ungrouped
    tags: list[str] = field(default_factory=list)
    offline: bool = False  # write locally, `wandb sync` later (clusters without internet)
    save_dir: str | None = None  # where wandb/ goes; None: $WANDB_DIR, else output_dir
    log_model: bool = False  # also upload the exported student (output_dir/student) as a model artifact


@dataclass
class NoLoggerConfig:
    kind: str = "none"


LOGGER_SCHEMAS: dict[str, type] = {"csv": CSVLoggerConfig, "wandb": WandbLoggerConfig, "none": NoLoggerConfig}


# ------------------------------------------------------------------------------------------------- root


@dataclass
class TrainConfig:
    conf: str = "tiny"  # the preset (conf/conf/<name>.yaml) this config came from; each preset sets it
    run_name: str = "${conf}"  # names the output folder and the logger run
    output_dir: str = "outputs/${run_name}"  # stage folders, student/, report.json (relative to the cwd)
    seed: int = 1234  # model init, dropout, sampling; data.seed follows it by default
    stages: list[str] = field(default_factory=lambda: ["init", "ild", "kd", "eval", "export"])
    # A rerun into output_dir that changes a stage's settings: redo this stage (one of `stages`) and the ones after
    # it; their old folders move to output_dir/replaced/<time>/ (train/runtime/rerun.py).
    restart_from: str | None = None
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ild: ILDConfig = field(default_factory=ILDConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: Any = MISSING  # typed by the chosen option (conf/strategy/*.yaml -> schema/strategy/<kind>)
    logger: Any = MISSING  # typed by the chosen option (conf/logger/*.yaml -> schema/logger/<kind>)


def register_configs() -> None:
    """Store the schema: `base_train` (primary), `schema/strategy/<kind>` and `schema/logger/<kind>`."""
    cs = ConfigStore.instance()
    cs.store(name="base_train", node=TrainConfig)
    for name, schema in STRATEGY_SCHEMAS.items():
        cs.store(group="schema/strategy", name=name, node=schema)
    for name, schema in LOGGER_SCHEMAS.items():
        cs.store(group="schema/logger", name=name, node=schema)


register_configs()  # Hydra's @hydra.main composes from the store: importing the schema fills it
