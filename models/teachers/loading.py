"""Load a teacher: a Hugging Face GQA causal LM of a supported family (models/teachers/registry.py), from the Hub,
a local directory or a llama.cpp GGUF file (dequantized once into a cached directory, models/gguf.py).
The config is read and checked by the family's adapter before any weights load, so unsupported teachers fail in
seconds, and local weight files are checked before `from_pretrained` reads them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from ..errors import first_line
from ..teacher_spec import TeacherSpec
from .adapter import rope_parameters
from .registry import describe_teacher


class TeacherLoadError(ValueError):
    """The teacher cannot be used; the message is one line naming teacher.name_or_path, the file and the cause."""


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_weight_files(name_or_path: str, required: bool = True) -> None:
    """Read the headers of a local teacher's safetensors files (cheap: no tensor data) so a truncated or corrupted
    file fails in seconds with its name, not deep inside `from_pretrained`. `required`: weights must be present.
    Hub ids and non-directories are left to `from_pretrained`."""
    import json

    from safetensors import safe_open

    path = Path(name_or_path)
    if not path.is_dir():
        return
    files = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
    if not files:
        if required:
            raise TeacherLoadError(
                f"teacher.name_or_path={name_or_path!r} has a config.json but no weights (one of {list(WEIGHT_FILES)})"
            )
        return
    shards = []
    for f in files:
        if f.name.endswith(".index.json"):
            try:
                weight_map = json.loads(f.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise TeacherLoadError(
                    f"teacher.name_or_path={name_or_path!r}: {f.name} is not a valid weight index ({e})"
                ) from e
            for shard in sorted(set(weight_map.values())):
                if not (path / shard).is_file():
                    raise TeacherLoadError(
                        f"teacher.name_or_path={name_or_path!r}: {f.name} lists {shard}, which is missing"
                    )
                shards.append(path / shard)
        else:
            shards.append(f)
    for shard in shards:
        if shard.suffix != ".safetensors":
            continue  # .bin files are read by torch.load(weights_only=True) inside from_pretrained
        try:
            with safe_open(str(shard), framework="pt") as handle:
                handle.keys()
        except Exception as e:  # SafetensorError (header damaged or the file shorter than its header says)
            raise TeacherLoadError(
                f"teacher.name_or_path={name_or_path!r}: {shard.name} is damaged ({first_line(e)}); download or "
                "copy it again"
            ) from e


def resolve_teacher_path(name_or_path: str, cache_root: Path | None = None) -> str:
    """The Hugging Face directory of a GGUF teacher (a `.gguf` file or a directory holding one), dequantized once
    into a cache (models/gguf.py); any other `name_or_path` (Hub id, HF directory) unchanged. Load the teacher's
    tokenizer from the result too: a GGUF carries its tokenizer inside, the materialized directory as files."""
    from ..gguf import find_gguf, materialize_gguf_teacher

    gguf = find_gguf(name_or_path)
    if gguf is None:
        return name_or_path
    return str(materialize_gguf_teacher(gguf, cache_root, name_or_path=name_or_path))


def load_teacher_config(
    name_or_path: str, trust_remote_code: bool = False, rope_scaling: Mapping[str, Any] | None = None
) -> PretrainedConfig:
    """The teacher's config (Hub id, local dir or GGUF), with a clear error for paths that hold no model. A GGUF's
    config comes from its metadata, without dequantizing (the same config its materialized directory gets).
    `rope_scaling` (teacher.rope_scaling) extends its context (`apply_rope_scaling`)."""
    from ..gguf import find_gguf, gguf_config

    gguf = find_gguf(name_or_path)
    if gguf is not None:
        return apply_rope_scaling(gguf_config(gguf, name_or_path=name_or_path), rope_scaling)
    path = Path(name_or_path)
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"teacher.name_or_path={name_or_path!r} is a path without a config.json")
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    return apply_rope_scaling(config, rope_scaling)


SCALED_ROPE_TYPES = ("linear", "yarn")  # what teacher.rope_scaling may set (both need only a factor)


def apply_rope_scaling(config: PretrainedConfig, scaling: Mapping[str, Any] | None) -> PretrainedConfig:
    """Train past the teacher's pretraining length: `scaling` ({rope_type: yarn | linear, factor: > 1, and the
    type's optional keys}) becomes its RoPE, and max_position_embeddings grows by `factor`. The student inherits
    the teacher's RoPE, so both see the same positions. A teacher whose RoPE is already scaled is refused: its
    max_position_embeddings is its limit."""
    if not scaling:
        return config
    scaling = check_rope_scaling(scaling)
    current = rope_parameters(config)
    if current["rope_type"] != "default":
        raise ValueError(
            f"teacher.rope_scaling: the teacher's RoPE is already scaled ({current['rope_type']}); its "
            f"max_position_embeddings {config.max_position_embeddings} is the limit"
        )
    original = config.max_position_embeddings
    config.rope_parameters = {**current, **scaling, "original_max_position_embeddings": original}
    config.max_position_embeddings = int(original * scaling["factor"])
    return config


def check_rope_scaling(scaling: Mapping[str, Any]) -> dict[str, Any]:
    """teacher.rope_scaling as a dict, or a ValueError naming the offending key and what is allowed."""
    scaling = dict(scaling)
    kind, factor = scaling.get("rope_type"), scaling.get("factor")
    if kind not in SCALED_ROPE_TYPES:
        raise ValueError(f"teacher.rope_scaling.rope_type={kind!r} is invalid; allowed: {list(SCALED_ROPE_TYPES)}")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
        raise ValueError(f"teacher.rope_scaling.factor={factor!r} is invalid; allowed: a number > 1")
    return scaling


def resolve_attn_implementation(name: str, cuda: bool | None = None) -> str:
    """`auto`: FlexAttention where the teacher runs on CUDA (`cuda`; default: CUDA is available), i.e. packed
    documents through a BlockMask: no quadratic mask, empty blocks skipped (models/documents.py); SDPA elsewhere
    (FlexAttention has no CPU backward and runs unfused there). Any other name is transformers' own."""
    if name != "auto":
        return name
    return "flex_attention" if (torch.cuda.is_available() if cuda is None else cuda) else "sdpa"


@contextmanager
def sdpa_attention(model: nn.Module) -> Iterator[None]:
    """SDPA, restored afterwards, for work on a teacher loaded with FlexAttention where a block mask skips nothing:
    `generate` (cached decoding: one document per row, one query per step; transformers would build a new compiled
    block mask per decoded length) and the init's one-document probes on the CPU (FlexAttention there compiles C++
    per shape: SmolLM2's 8 MLA layers' probes 13.6 s instead of 3.9 on two CPU cores, and its init stage 61 s on an
    H100 machine). Other models (the student, an SDPA teacher) are left as they are."""
    flex = isinstance(model, PreTrainedModel) and model.config._attn_implementation == "flex_attention"
    if flex:
        model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if flex:
            model.set_attn_implementation("flex_attention")


def load_teacher(
    name_or_path: str,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    rope_scaling: Mapping[str, Any] | None = None,
) -> tuple[PreTrainedModel, TeacherSpec]:
    """Load a supported teacher frozen in eval mode; the architecture is checked before the weights. A GGUF teacher
    loads from its materialized directory (`resolve_teacher_path`)."""
    name_or_path = resolve_teacher_path(name_or_path)
    config = load_teacher_config(name_or_path, trust_remote_code, rope_scaling)
    spec = describe_teacher(config)
    check_weight_files(name_or_path)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    attn_implementation = resolve_attn_implementation(attn_implementation)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            config=config,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        )
    except Exception as e:  # damaged weights, a missing shard, a download that failed: one line naming the teacher
        raise TeacherLoadError(
            f"teacher.name_or_path={name_or_path!r}: cannot load the weights ({type(e).__name__}: {first_line(e)})"
        ) from e
    check_finite_weights(model, name_or_path)
    model.to(device).eval().requires_grad_(False)
    return model, spec


@torch.no_grad()
def check_finite_weights(model: torch.nn.Module, name_or_path: str) -> None:
    """Damaged weights (NaN / inf bytes inside an intact file) load without an error and would train a NaN student
    that reports 'top-1 agree 1.000'; one pass over the tensors (cheap next to reading them) names them instead."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise TeacherLoadError(
            f"teacher.name_or_path={name_or_path!r}: non-finite values (NaN or inf) in {', '.join(bad[:3])}{more}: "
            "the weight files are damaged; download or convert them again"
        )
