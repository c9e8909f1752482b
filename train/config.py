"""The typed configuration of `python -m train`: a dataclass schema in Hydra's ConfigStore, and its checks.

Two layers catch mistakes before any model loads:

1. Composition. `conf/train.yaml` starts from the schema stored here as `base_train`; the group options under
   `conf/strategy/` and `conf/logger/` start from `schema/<group>/<kind>`. OmegaConf then rejects unknown keys (a typo
   such as `student.mla.kv_lora_rnk=3`) and values of the wrong type (`ild.max_steps=abc`) while composing.
2. `validate_config(cfg)`: what types cannot say (choices, ranges, stage order, the student against the
   teacher's shape). It raises `ConfigError` with one line naming the key, the bad value and what is allowed.
   It reads the teacher's config.json only for a local directory (for a .gguf file its metadata, without
   dequantizing); a Hub id gets every check that needs no teacher shape and the shape checks happen in the
   pipeline when the config arrives (no network here, so offline machines and login nodes can validate).
   For `teacher.name_or_path=tiny` the shape is `teacher.tiny`, so the full student check runs.

`compose_config(overrides)` composes through Hydra's compose API, for tests and programmatic use; the main
job uses `@hydra.main(config_path="../conf", config_name="train", version_base=None)` then `validate_config`.
Importing this module registers the schema, so import it before Hydra composes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from data.config import DataConfig, SourceConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
STAGES = ("init", "ild", "select", "kd", "dpo", "eval", "export")  # the only order stages run in
DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true", "64", "bf16", "16")
ACCELERATORS = ("cpu", "gpu", "cuda", "auto")
TINY_TEACHER = "tiny"  # teacher.name_or_path that means "train the embedded Llama of shape teacher.tiny"
TEACHER_CHOICES = "'tiny', an existing local directory, a .gguf file or a Hub id 'org/name'"


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line naming the key, the value and what is allowed."""


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
class TeacherConfig:
    # "tiny" (the embedded teacher, see `tiny`), a Hub id ("meta-llama/Llama-3.2-1B-Instruct"), a local
    # directory with config.json + weights, or a llama.cpp .gguf file (or a directory holding one), dequantized
    # once into $ZEBRA_DISTILL_CACHE/gguf (models/gguf.py). Llama 3.x, Qwen2/2.5/3 and Mistral are supported.
    name_or_path: str = TINY_TEACHER
    dtype: str = "float32"  # float32 | bfloat16 | float16: the frozen teacher's weights and forward
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"  # transformers attention backend of the teacher
    tiny: TinyTeacherConfig = field(default_factory=TinyTeacherConfig)


# ----------------------------------------------------------------------------------------------- student


@dataclass
class MLASettings:
    """`student.mla`: models.mixer_mla.MLAConfig's fields (same names and meaning) plus two init choices.
    A None on qkv_bias / o_bias / qk_norm means "as the teacher has it"."""

    kv_lora_rank: int = 128  # latent size per token (the MLA cache is this + the RoPE key)
    kv_lora_ranks: list[int] | None = None  # per-layer ranks (index = layer); None: kv_lora_rank everywhere
    q_lora_rank: int | None = None  # None: full-rank q_proj; an int: low-rank queries (SVD-initialized)
    qk_nope_head_dim: int = 32  # nope + rope must equal the teacher's head_dim
    qk_rope_head_dim: int = 32  # key dims that keep RoPE (cached once per RoPE head)
    v_head_dim: int = 64  # must equal the teacher's head_dim
    rope_heads: str = "shared"  # "shared" (one RoPE key head, DeepSeek) | "per_kv_head"
    kv_up_layout: str = "gqa"  # "gqa": one up-projection per teacher KV head | "per_head"
    latent_norm: bool = False  # RMSNorm on the KV latent (SVD init is exact without it)
    q_latent_norm: bool = False  # RMSNorm on the query latent when q_lora_rank is set
    qkv_bias: bool | None = None  # None: the teacher's (Qwen2 has q/k/v biases)
    o_bias: bool | None = None  # None: the teacher's
    qk_norm: bool | None = None  # None: the teacher's (Qwen3 has per-head q/k RMSNorm)
    softmax_scale: float | None = None  # None: 1/sqrt(qk_nope_head_dim + qk_rope_head_dim)
    rope_freq_indices: list[int] | None = None  # teacher frequency pairs kept as RoPE; None: chosen by rope_pairs
    # true: RoPE over every key dim per KV head and full ranks, so an all-MLA student reproduces the teacher
    # exactly (overrides the dims above); the end-to-end proof that conversion is right.
    lossless: bool = False
    # Not MLAConfig fields: how initialization chooses ranks and RoPE pairs.
    energy: float | None = None  # e.g. 0.95: per-layer kv ranks keeping this share of squared singular values
    rope_pairs: str = "energy"  # "energy": the pairs with the most logit mass | "uniform": evenly spaced


@dataclass
class MambaSettings:
    """`student.mamba`: models.mixer_mamba2.MambaConfig's fields (same names and meaning) plus the conv init.
    Initialization from attention (x <- W_v, B <- W_k, C <- W_q) needs layout "gqa" and headdim = d_state =
    the teacher's head_dim; None takes those from the teacher."""

    d_state: int | None = None  # None: the teacher's head_dim
    headdim: int | None = None  # None: the teacher's head_dim
    num_heads: int | None = None  # None: the teacher's num_attention_heads
    layout: str = "gqa"  # "gqa" (Zebra-Llama: x, B per KV head, C per head) | "standard" (mamba-ssm)
    ngroups: int = 1  # B/C groups, standard layout only
    d_conv: int = 4  # causal depthwise conv width
    chunk_size: int = 256  # SSD scan chunk (tokens)
    conv_bias: bool = True
    in_proj_bias: bool | None = None  # None: the teacher's q/k/v bias
    out_proj_bias: bool | None = None  # None: the teacher's o bias
    norm_groups: int = 1  # gated RMSNorm groups over d_inner
    norm_before_gate: bool = False  # mamba-ssm's Mamba2 default
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: list[float] = field(default_factory=lambda: [0.0, math.inf])  # clamp of softplus(dt)
    A_init_range: list[float] = field(default_factory=lambda: [1.0, 16.0])
    use_triton: bool = True  # mamba-ssm Triton kernels for CUDA tensors when importable
    conv_init: str = "identity"  # not a MambaConfig field: "identity" (newest input passes) | "random"


@dataclass
class StudentConfig:
    # Which layers become MLA: a list of indices, "all" or "none"; every other layer is Mamba2. With the
    # `select` stage, the list's length is the number of MLA layers SMART places (unless select says).
    mla_layers: Any = "all"  # or "smart": the select stage chooses (needs num_mla_layers or kv_budget)
    num_mla_layers: int | None = None  # with mla_layers=smart: how many MLA layers SMART places
    kv_budget: float | None = None  # with mla_layers=smart: KV cache per token as a fraction of the teacher's
    mla: MLASettings = field(default_factory=MLASettings)
    mamba: MambaSettings = field(default_factory=MambaSettings)
    gradient_checkpointing: bool = False  # recompute each student block in backward (memory for compute)
    # "attention": MLA by SVD of the teacher's attention, Mamba2 from its Q/K/V/O (the recipe); "random": mixers
    # from the model's own initializer, MLPs / norms / embeddings still copied (the ablation baseline)
    mixer_init: str = "attention"
    # torch.compile RMSNorm, the MLP activation and Mamba2's conv for CUDA training steps (models/compile.py)
    compile: bool = False


# --------------------------------------------------------------------------------------------- training


@dataclass
class ILDConfig:
    """Layer-wise alignment: every student layer gets the teacher's input and matches its outputs."""

    max_steps: int = 1000  # optimizer steps
    lr: float = 1e-3  # peak AdamW learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50  # linear warmup
    weight_decay: float = 0.0  # on matrices only
    loss: str = "mse"  # "mse": mean squared error per element | "l2": L2 norm per token (Zebra-Llama's)
    output_weight: float = 1.0  # weight of the layer-output term
    mixer_weight: float = 1.0  # weight of the mixer (attention) output term
    trainable: str = "mixers"  # "mixers": only MLA / Mamba2 mixers train | "layers": mixers + MLPs + norms
    # "both": align an MLA and a Mamba2 candidate for every layer (what `select` needs); "assigned": only the
    # mixer of student.mla_layers; "auto": "both" when the select stage runs, else "assigned".
    candidates: str = "auto"
    val_every_n_steps: int = 200
    checkpoint_every_n_steps: int = 500


@dataclass
class SelectConfig:
    """SMART layer selection from the ILD losses of both candidates."""

    num_mla_layers: int | None = None  # None: len(student.mla_layers) (which must then be a list)
    keep_terminal: bool = True  # force MLA at both ends of the stack (SMART: terminal layers are the most sensitive)
    rule: str = "smart"  # "smart": sensitivity-driven | "uniform": evenly spaced, ignoring the scores (a baseline)


@dataclass
class KDConfig:
    """End-to-end distillation against the teacher's logits."""

    max_steps: int = 1000
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.0
    divergence: str = "forward_kl"  # "forward_kl" KL(teacher||student) | "reverse_kl" | "jsd"
    jsd_beta: float = 0.5  # jsd only: mixture weight, in (0, 1)
    temperature: float = 1.0  # softens both distributions
    kl_weight: float = 1.0
    ce_weight: float = 0.0  # cross-entropy on the data's labels, added to the divergence
    chunk_tokens: int = 4096  # tokens per chunk of the vocabulary projection inside the loss (memory)
    use_triton: bool = True  # CUDA: one fused Triton kernel per chunk (train/kd_kernel.py), else torch ops
    # A (larger) KD teacher sharing the tokenizer, e.g. meta-llama/Llama-3.1-8B-Instruct; None: `teacher`.
    teacher_name_or_path: str | None = None
    val_every_n_steps: int = 200
    checkpoint_every_n_steps: int = 500


@dataclass
class DPOConfig:
    """Optional preference tuning after KD."""

    max_steps: int = 500
    lr: float = 5e-7
    min_lr_ratio: float = 0.0
    warmup_steps: int = 50
    weight_decay: float = 0.0
    beta: float = 0.01  # DPO temperature on the policy / reference log-ratio
    # Preference datasets (chosen / rejected); required when "dpo" is in stages.
    sources: list[SourceConfig] = field(default_factory=list)
    val_every_n_steps: int = 200
    checkpoint_every_n_steps: int = 500


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
    """One W&B run per pipeline run (train/tracking.py); its id: $WANDB_RUN_ID, else <output_dir>/.wandb_run_id."""

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


register_configs()


# ---------------------------------------------------------------------------------------------- compose


def _one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf errors span lines and bury the cause; join the first line of each error in the chain."""
    options = getattr(exc, "options", None)
    missing = getattr(exc, "missing_cfg_file", None)
    if options and missing and "/" in missing:  # an unknown option of a config group, e.g. conf=nope
        group, name = missing.rsplit("/", 1)
        return f"{group}={name!r} is not an option of {group}; available: {', '.join(options)}"
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and "$" not in ln]
        if lines:
            key = next((ln for ln in lines if ln.startswith("full_key:")), None)
            first = lines[0].rstrip(".")
            parts.append(first + (f" ({key})" if key and key not in first else ""))
        exc = exc.__cause__ or exc.__context__
    return ": ".join(dict.fromkeys(parts))


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _override_value(overrides: list[str], key: str) -> str | None:
    for override in overrides:
        name, sep, value = override.lstrip("+~").partition("=")
        if sep and name == key:
            return value
    return None


def composition_message(exc: BaseException, overrides: list[str]) -> str:
    """One line for a Hydra / OmegaConf composition error: the override, the key, the bad value, what is allowed."""
    import difflib

    from hydra.errors import OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    for e in _chain(exc):
        if isinstance(e, OverrideParseException):
            reason = str(e).strip().splitlines()[0] if str(e).strip() else "syntax error"
            return (
                f"cannot parse the override {e.override!r}: {reason}; write key=value, lists as key=[a,b], and quote "
                "values with spaces or special characters"
            )
        full_key = getattr(e, "full_key", None)
        if isinstance(e, (ConfigAttributeError, ConfigKeyError)) and full_key:
            schema = getattr(e, "object_type", None)
            allowed = sorted(f.name for f in fields(schema)) if schema is not None and is_dataclass(schema) else []
            parent = full_key.rpartition(".")[0]
            value = _override_value(overrides, full_key)
            message = f"{full_key}{'' if value is None else '=' + value} is not a config key"
            close = difflib.get_close_matches(str(e.key), allowed, n=1)
            if close:
                message += f" (did you mean {parent + '.' if parent else ''}{close[0]}?)"
            if allowed:
                message += f"; allowed {'in ' + parent if parent else 'at the top level'}: {', '.join(allowed)}"
            return message
        if full_key and hasattr(e, "msg"):  # any other OmegaConf error: a wrong type, a broken interpolation
            value = _override_value(overrides, full_key)
            reason = str(e.msg or e).strip().splitlines()[0]
            return f"{full_key}={value} is invalid: {reason}" if value is not None else f"{full_key}: {reason}"
    message = _one_line(exc)
    if message.startswith("Ambiguous value"):
        message += ": write a list as key=[a,b], or quote a string with commas"
    return message


def compose_config(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose `conf/<config_name>.yaml` with Hydra overrides (e.g. ["conf=zebra_1b", "kd.lr=1e-4"]).

    Unknown presets, unknown keys and wrong types raise ConfigError (one line); the result is typed but not
    yet validated (call `validate_config`). Hydra's own `hydra:` node is not included.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        try:
            return compose(config_name=config_name, overrides=list(overrides or []))
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(composition_message(e, list(overrides or []))) from e


# --------------------------------------------------------------------------------------------- validate


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is invalid; allowed: {allowed}")


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        _fail(key, value, " | ".join(map(str, allowed)))


def _at_least(key: str, value: Any, low: float, integer: bool = True) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value >= low:
        _fail(key, value, f"{'an integer' if integer else 'a number'} >= {low}")


def _between(key: str, value: float, low: float, high: float, open_low: bool = False) -> None:
    ok = (low < value if open_low else low <= value) and value <= high
    if not ok:
        _fail(key, value, f"a number in {'(' if open_low else '['}{low}, {high}]")


def check_stages(stages: list[str]) -> None:
    """Stages are a non-empty, duplicate-free subsequence of STAGES."""
    stages = list(stages)
    if not stages:
        _fail("stages", stages, f"a non-empty ordered subset of {list(STAGES)}")
    for s in stages:
        if s not in STAGES:
            raise ConfigError(f"stages: {s!r} is not a stage; allowed, in this order: {', '.join(STAGES)}")
    for a, b in zip(stages, stages[1:], strict=False):
        if STAGES.index(b) <= STAGES.index(a):
            raise ConfigError(
                f"stages={stages}: {b!r} after {a!r} is out of order (or repeated); "
                f"stages run in the order {', '.join(STAGES)}"
            )


def _check_known_keys(node: Any, path: str = "") -> None:
    """Keys added with Hydra's `+` (e.g. `+student.mla.kv_lora_rnk=3`) bypass the schema; refuse them here."""
    if isinstance(node, ListConfig):
        children = [(f"{path.rstrip('.')}[{i}].", node._get_node(i)) for i in range(len(node))]
    else:
        schema = OmegaConf.get_type(node)
        known = {f.name for f in fields(schema)} if schema is not None and is_dataclass(schema) else None
        children = []
        for key in node.keys():
            child = node._get_node(key)
            if known is not None and key not in known:
                import difflib

                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f" (did you mean {path}{close[0]}?)" if close else ""
                allowed = ", ".join(sorted(known))
                raise ConfigError(f"{path}{key}={child._value()!r} is not a config key{hint}; allowed here: {allowed}")
            children.append((f"{path}{key}.", child))
    for child_path, child in children:
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_none() and not child._is_missing():
            _check_known_keys(child, child_path)


def _typed(cfg: Any) -> TrainConfig:
    """The config as TrainConfig (dataclasses, resolved); untyped input (a saved config.yaml) is typed here."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        if not isinstance(cfg, DictConfig) or OmegaConf.get_type(cfg) is not TrainConfig:
            cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        _check_known_keys(cfg)
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from e
    for group, schemas, kind_key in (("strategy", STRATEGY_SCHEMAS, "name"), ("logger", LOGGER_SCHEMAS, "kind")):
        value = getattr(obj, group)
        if isinstance(value, dict):  # untyped (no schema in its defaults): type it by its name / kind
            kind = value.get(kind_key)
            schema = schemas.get("deepspeed" if str(kind).startswith("deepspeed") else kind)
            if schema is None:
                _fail(f"{group}.{kind_key}", kind, " | ".join(schemas))
            try:
                value = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), value))
            except OmegaConfBaseException as e:
                raise ConfigError(f"{group}: {_one_line(e)}") from e
            setattr(obj, group, value)
    return obj


def tiny_teacher_positions(tiny_seq_len: int, data_seq_len: int) -> int:
    """max_position_embeddings of the embedded teacher: it is built for the run, so it fits both the length it
    trains on (teacher.tiny.seq_len) and the run's data.seq_len."""
    return max(512, tiny_seq_len, data_seq_len)


def _teacher_spec(teacher: TeacherConfig, vocab_size: int = 1024, fetch: bool = False, data_seq_len: int = 0):
    """The TeacherSpec used to check the student: from `teacher.tiny`, from a GGUF file's metadata (models/gguf.py,
    no dequantization), from a local config.json (whose safetensors headers are checked too), or for a Hub id None
    (shape checks wait for the pipeline) unless `fetch` (read its config.json from the Hub or the local HF cache).
    `vocab_size` only fills the tiny spec (no check uses it)."""
    from models.errors import first_line
    from models.gguf import find_gguf, gguf_config
    from models.teacher import TeacherSpec, check_weight_files, describe_teacher, load_teacher_config

    name = teacher.name_or_path
    if name == TINY_TEACHER:
        t = teacher.tiny
        return TeacherSpec(
            family="llama",
            vocab_size=vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_layers=t.num_layers,
            num_heads=t.num_heads,
            num_kv_heads=t.num_kv_heads,
            head_dim=t.hidden_size // t.num_heads,
            hidden_act="silu",
            rms_norm_eps=1e-6,
            max_position_embeddings=tiny_teacher_positions(t.seq_len, data_seq_len),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=True,
            qkv_bias=False,
            o_bias=False,
            mlp_bias=False,
            qk_norm=False,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
    try:
        gguf = find_gguf(name)
        if gguf is not None:  # described from the GGUF metadata; nothing is dequantized here
            return describe_teacher(gguf_config(gguf, name_or_path=name))
    except (OSError, ValueError) as e:  # models/gguf.py's messages are whole: the first line, not the chain
        message = first_line(e)
        prefix = "" if message.startswith("teacher.") else f"teacher.name_or_path={name!r}: "
        raise ConfigError(prefix + message) from e
    path = Path(name).expanduser()
    if path.exists():
        try:
            spec = describe_teacher(load_teacher_config(str(path), teacher.trust_remote_code))
            check_weight_files(str(path), required=False)
            return spec
        except (OSError, ValueError) as e:
            message = _remote_code_message(e, name) or _one_line(e)
            raise ConfigError(
                message if message.startswith("teacher.") else f"teacher.name_or_path={name!r}: {message}"
            ) from e
    if not is_hub_id(name):
        _fail("teacher.name_or_path", name, TEACHER_CHOICES)
    if not fetch:
        return None
    try:
        return describe_teacher(load_teacher_config(name, teacher.trust_remote_code))
    except (OSError, ValueError) as e:
        if (message := _remote_code_message(e, name)) is not None:
            raise ConfigError(message) from e
        raise ConfigError(
            f"teacher.name_or_path={name!r} is not a local directory and its config could not be read from the "
            f"Hub: {_one_line(e)}"
        ) from e


def _remote_code_message(error: BaseException, name: str) -> str | None:
    """transformers refuses a teacher whose code ships with it unless trust_remote_code; say which key allows it."""
    if "trust_remote_code" not in str(error):
        return None
    return (
        f"teacher.name_or_path={name!r} needs its own Python code (auto_map), which runs only with "
        "teacher.trust_remote_code=true: read that code first; supported families load without it"
    )


def is_hub_id(name: str) -> bool:
    """'org/name' or 'name' of letters, digits, '-', '_', '.'; paths ('/x', './x', '~/x', 'a/b/c') are not."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name)) and ".." not in name


def student_init_kwargs(student: StudentConfig | DictConfig) -> dict[str, Any]:
    """Keyword arguments of `models.init.convert_teacher` from `student` (build_student_config takes the same
    minus rope_pairs / conv_init): MLAConfig / MambaConfig dicts without the init-only keys, and with None
    values dropped so the teacher-derived defaults (biases, qk_norm, Mamba head sizes) apply."""
    from models.mixers import MIXERS

    if isinstance(student, DictConfig):
        student = OmegaConf.to_object(student)
    extra = {
        "energy": student.mla.energy,
        "rope_pairs": student.mla.rope_pairs,
        "lossless": student.mla.lossless,
        "conv_init": student.mamba.conv_init,
        "mixer_init": student.mixer_init,
    }
    settings = {}
    for kind in MIXERS:  # student.<kind name>: that kind's settings (and the init-only keys above)
        group = getattr(student, kind)
        values = {f.name: getattr(group, f.name) for f in fields(group) if f.name not in extra}
        settings[kind] = {k: v for k, v in values.items() if v is not None}
    layers = student.mla_layers
    return {
        "mla_layers": list(layers) if isinstance(layers, (list, tuple)) else layers,
        **settings,
        **extra,
    }


def _check_student(cfg: TrainConfig, spec) -> None:
    s = cfg.student
    layers = s.mla_layers
    if isinstance(layers, str):
        _choice("student.mla_layers", layers, ("all", "none", "smart"))
        if layers == "smart" and (s.num_mla_layers is None) == (s.kv_budget is None):
            _fail(
                "student.num_mla_layers",
                s.num_mla_layers,
                "set exactly one of it and student.kv_budget with mla_layers=smart",
            )
        if s.kv_budget is not None:
            _between("student.kv_budget", s.kv_budget, 0.0, 1.0, open_low=True)
    elif not isinstance(layers, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in layers
    ):
        _fail("student.mla_layers", layers, "a list of layer indices, 'all' or 'none'")
    elif any(i < 0 for i in layers) or len(set(layers)) != len(layers):
        _fail("student.mla_layers", list(layers), "distinct layer indices >= 0")
    _choice("student.mla.rope_pairs", s.mla.rope_pairs, ("energy", "uniform"))
    _choice("student.mla.rope_heads", s.mla.rope_heads, ("shared", "per_kv_head"))
    _choice("student.mla.kv_up_layout", s.mla.kv_up_layout, ("gqa", "per_head"))
    if s.mla.energy is not None:
        _between("student.mla.energy", s.mla.energy, 0.0, 1.0, open_low=True)
    _choice("student.mamba.conv_init", s.mamba.conv_init, ("identity", "random"))
    from models.init.transfer import MIXER_INITS

    _choice("student.mixer_init", s.mixer_init, MIXER_INITS)
    _choice("student.mamba.layout", s.mamba.layout, ("gqa", "standard"))
    for key in ("d_conv", "chunk_size", "ngroups", "norm_groups"):
        _at_least(f"student.mamba.{key}", getattr(s.mamba, key), 1)
    for key in ("dt_limit", "A_init_range"):
        if len(getattr(s.mamba, key)) != 2:
            _fail(f"student.mamba.{key}", getattr(s.mamba, key), "two numbers [low, high]")
    if spec is None:
        return
    from models.init.student_config import build_student_config

    kwargs = student_init_kwargs(s)
    for init_only in ("rope_pairs", "conv_init", "mixer_init"):
        kwargs.pop(init_only)
    if kwargs["mla_layers"] == "smart":  # the map is chosen later; every layer must fit either mixer
        kwargs["mla_layers"] = "all"
        build_student_config(spec, **{**kwargs, "mla_layers": "none"})
    try:
        build_student_config(spec, **kwargs)
    except ValueError as e:
        msg = _one_line(e)
        if msg.startswith(("mla.", "mamba.")):  # MLAConfig / MambaConfig.validate name keys without the group
            msg = "student." + msg
        raise ConfigError(msg) from e


def _check_optim(group: str, c: Any) -> None:
    _at_least(f"{group}.max_steps", c.max_steps, 1)
    if not (c.lr > 0 and math.isfinite(c.lr)):
        _fail(f"{group}.lr", c.lr, "a finite number > 0")
    _between(f"{group}.min_lr_ratio", c.min_lr_ratio, 0.0, 1.0)
    _at_least(f"{group}.warmup_steps", c.warmup_steps, 0)
    if c.warmup_steps > c.max_steps:
        _fail(f"{group}.warmup_steps", c.warmup_steps, f"at most {group}.max_steps ({c.max_steps})")
    _at_least(f"{group}.weight_decay", c.weight_decay, 0.0, integer=False)
    _at_least(f"{group}.val_every_n_steps", c.val_every_n_steps, 1)
    _at_least(f"{group}.checkpoint_every_n_steps", c.checkpoint_every_n_steps, 1)


def _check_training(cfg: TrainConfig) -> None:
    stages = cfg.stages
    ild, kd, sel = cfg.ild, cfg.kd, cfg.select
    _check_optim("ild", ild)
    _choice("ild.loss", ild.loss, ("mse", "l2"))
    _choice("ild.trainable", ild.trainable, ("mixers", "layers"))
    _choice("ild.candidates", ild.candidates, ("auto", "both", "assigned"))
    _at_least("ild.output_weight", ild.output_weight, 0.0, integer=False)
    _at_least("ild.mixer_weight", ild.mixer_weight, 0.0, integer=False)
    if ild.output_weight == 0 and ild.mixer_weight == 0:
        _fail("ild.output_weight", ild.output_weight, "> 0 when ild.mixer_weight is 0 (nothing to learn)")
    if cfg.student.mla_layers == "smart" and "select" not in stages:
        _fail("student.mla_layers", "smart", "a list, 'all' or 'none' unless the select stage runs")
    if "select" in stages:
        if "ild" not in stages:
            raise ConfigError(f"stages={list(stages)}: 'select' needs 'ild' before it (SMART scores are ILD losses)")
        if ild.candidates == "assigned":
            _fail("ild.candidates", ild.candidates, "'auto' or 'both' when the select stage runs")
        if (
            sel.num_mla_layers is None
            and cfg.student.mla_layers != "smart"
            and not isinstance(cfg.student.mla_layers, (list, tuple))
        ):
            _fail(
                "select.num_mla_layers",
                None,
                f"an integer when student.mla_layers={cfg.student.mla_layers!r} is not a list (how many to place)",
            )
    if sel.num_mla_layers is not None:
        _at_least("select.num_mla_layers", sel.num_mla_layers, 0)
    from models.select import SELECT_RULES

    _choice("select.rule", sel.rule, SELECT_RULES)
    _check_optim("kd", kd)
    _choice("kd.divergence", kd.divergence, ("forward_kl", "reverse_kl", "jsd"))
    _between("kd.jsd_beta", kd.jsd_beta, 0.0, 1.0, open_low=True)
    if kd.jsd_beta == 1.0:
        _fail("kd.jsd_beta", kd.jsd_beta, "a number in (0, 1)")
    if not kd.temperature > 0:
        _fail("kd.temperature", kd.temperature, "a number > 0")
    _at_least("kd.kl_weight", kd.kl_weight, 0.0, integer=False)
    _at_least("kd.ce_weight", kd.ce_weight, 0.0, integer=False)
    if kd.kl_weight == 0 and kd.ce_weight == 0:
        _fail("kd.kl_weight", kd.kl_weight, "> 0 when kd.ce_weight is 0 (no loss)")
    _at_least("kd.chunk_tokens", kd.chunk_tokens, 1)
    if kd.teacher_name_or_path is not None:
        name = kd.teacher_name_or_path
        if not Path(name).expanduser().exists() and not is_hub_id(name):
            _fail("kd.teacher_name_or_path", name, "null, an existing local directory or a Hub id 'org/name'")
    _check_optim("dpo", cfg.dpo)
    if not cfg.dpo.beta > 0:
        _fail("dpo.beta", cfg.dpo.beta, "a number > 0")
    if "dpo" in stages and not cfg.dpo.sources and cfg.teacher.name_or_path != "tiny":
        # The embedded preference pairs are written in the tiny corpus's language: only for the tiny teacher.
        _fail("dpo.sources", [], "at least one preference dataset when the dpo stage runs")
    for i, src in enumerate(cfg.dpo.sources):
        try:
            src.validate(f"dpo.sources[{i}]")
        except ValueError as e:
            raise ConfigError(str(e)) from e
    if cfg.eval.max_batches is not None:
        _at_least("eval.max_batches", cfg.eval.max_batches, 1)
    _at_least("eval.num_generations", cfg.eval.num_generations, 0)
    _at_least("eval.max_new_tokens", cfg.eval.max_new_tokens, 1)
    _choice("export.dtype", cfg.export.dtype, DTYPES)
    _choice("faults.nonfinite_loss", cfg.faults.nonfinite_loss, ("skip", "stop"))
    _at_least("faults.max_skips", cfg.faults.max_skips, 0)


def _check_runtime(cfg: TrainConfig) -> None:
    t = cfg.trainer
    _choice("trainer.accelerator", t.accelerator, ACCELERATORS)
    _choice("trainer.precision", str(t.precision), PRECISIONS)
    _at_least("trainer.num_nodes", t.num_nodes, 1)
    _at_least("trainer.accumulate_grad_batches", t.accumulate_grad_batches, 1)
    _at_least("trainer.log_every_n_steps", t.log_every_n_steps, 1)
    if t.gradient_clip_val is not None:
        _at_least("trainer.gradient_clip_val", t.gradient_clip_val, 0.0, integer=False)
    if t.deterministic not in (True, False, "warn"):
        _fail("trainer.deterministic", t.deterministic, "true | false | warn")
    d = t.devices
    if not (
        d == "auto"
        or (isinstance(d, int) and not isinstance(d, bool) and (d >= 1 or d == -1))
        or (isinstance(d, (list, tuple)) and d and all(isinstance(i, int) for i in d))
    ):
        _fail("trainer.devices", d, "an integer >= 1, -1 (all), 'auto' or a list of device ids")
    st = cfg.strategy
    if isinstance(st, DeepSpeedStrategyConfig):
        if not st.name.startswith("deepspeed"):
            _fail("strategy.name", st.name, "a name starting with 'deepspeed' for DeepSpeed settings")
        _choice("strategy.stage", st.stage, (1, 2, 3))
        if st.offload_parameters and st.stage != 3:
            _fail("strategy.offload_parameters", True, f"false unless strategy.stage is 3 (it is {st.stage})")
        # DeepSpeed runs on CPU processes too (gloo, train/deepspeed_strategy.py), in full precision only.
        if t.accelerator == "cpu" and t.precision not in ("32-true", "32", 32):
            _fail("trainer.precision", t.precision, f"32-true with strategy {st.name!r} on CPU")
    elif isinstance(st, DDPStrategyConfig):
        _choice("strategy.name", st.name, ("ddp", "ddp_spawn"))
    else:
        _choice("strategy.name", st.name, ("auto",))
    _choice("logger.kind", cfg.logger.kind, tuple(LOGGER_SCHEMAS))
    if isinstance(cfg.logger, WandbLoggerConfig):
        project = cfg.logger.project
        if not project or len(project) > 128 or re.search(r"[/\\#?%:]", project):
            # wandb's own rule, checked here so the mistake shows before any model loads.
            _fail("logger.project", project, "a name of 1 to 128 characters without / \\ # ? % :")
        if not cfg.logger.name:
            _fail("logger.name", cfg.logger.name, "a non-empty run name (default: run_name)")


def _check_teacher(cfg: TrainConfig) -> None:
    t = cfg.teacher
    if not t.name_or_path:
        _fail("teacher.name_or_path", t.name_or_path, TEACHER_CHOICES)
    _choice("teacher.dtype", t.dtype, DTYPES)
    _choice("teacher.attn_implementation", t.attn_implementation, ATTN_IMPLEMENTATIONS)
    if t.name_or_path == TINY_TEACHER:
        tiny = t.tiny
        for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "batch_size"):
            _at_least(f"teacher.tiny.{key}", getattr(tiny, key), 1)
        _at_least("teacher.tiny.train_steps", tiny.train_steps, 0)
        _at_least("teacher.tiny.seq_len", tiny.seq_len, 2)
        if not tiny.lr > 0:
            _fail("teacher.tiny.lr", tiny.lr, "a number > 0")
        if tiny.hidden_size % tiny.num_heads or (tiny.hidden_size // tiny.num_heads) % 2:
            _fail(
                "teacher.tiny.num_heads",
                tiny.num_heads,
                f"a divisor of hidden_size={tiny.hidden_size} giving an even head_dim",
            )
        if tiny.num_heads % tiny.num_kv_heads:
            _fail("teacher.tiny.num_kv_heads", tiny.num_kv_heads, f"a divisor of num_heads={tiny.num_heads}")


def validate_config(cfg: Any, fetch_teacher: bool = False) -> None:
    """Semantic checks before any model loads; raise ConfigError (one line: key, value, what is allowed).

    Reads at most the teacher's config.json (and its safetensors headers), and only for a local directory (see the
    module docstring); `fetch_teacher` also reads a Hub teacher's config.json, so its shape checks run too (the
    main job does, it needs the teacher anyway).
    """
    from hydra.core.hydra_config import HydraConfig

    c = _typed(cfg)
    if HydraConfig.initialized():  # under @hydra.main: the preset must say its own name
        choice = HydraConfig.get().runtime.choices.get("conf")
        if choice is not None and choice != c.conf:
            _fail(
                "conf",
                c.conf,
                f"the selected preset's name {choice!r} (conf/conf/{choice}.yaml must set conf: {choice})",
            )
    check_stages(c.stages)
    if not c.output_dir:
        _fail("output_dir", c.output_dir, "a directory path")
    _check_teacher(c)
    try:
        c.data.validate()
    except ValueError as e:
        raise ConfigError(_one_line(e).replace("data config: ", "data.")) from e
    _check_training(c)
    _check_runtime(c)
    spec = _teacher_spec(c.teacher, fetch=fetch_teacher, data_seq_len=c.data.seq_len)
    known = spec is not None and c.teacher.name_or_path != TINY_TEACHER  # the tiny teacher is built to fit
    if known and c.data.seq_len > spec.max_position_embeddings:
        _fail(
            "data.seq_len",
            c.data.seq_len,
            f"at most the teacher's max_position_embeddings {spec.max_position_embeddings}",
        )
    _check_student(c, spec)
