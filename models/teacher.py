"""Teachers: load a Hugging Face GQA causal LM and describe the shapes and quirks the student must copy.

Supported families: Llama (3.x), Qwen2 / Qwen2.5, Qwen3 and Mistral, from the Hub, a local directory or a llama.cpp
GGUF file (dequantized once into a cached directory, models/gguf.py). They share the module layout
(model.layers.i.self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input/post_attention_layernorm) and
differ in attention biases (Qwen2), per-head q/k RMSNorm (Qwen3), tied embeddings and RoPE variants.
The config is read and checked before any weights load, so unsupported teachers fail in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .errors import first_line
from .rope import SUPPORTED_ROPE_TYPES
from .teacher_spec import TeacherSpec

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


def _rope_parameters(config: PretrainedConfig) -> dict:
    """transformers 5 keeps RoPE in `rope_parameters`; older configs use rope_theta + rope_scaling."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        params = dict(params)
    else:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_type", params.pop("type", "default"))
        params["rope_theta"] = float(getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    if params["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"teacher rope_type={params['rope_type']!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}"
        )
    return params


def describe_teacher(config: PretrainedConfig) -> TeacherSpec:
    """Check that the teacher is a supported GQA family and return what the student copies."""
    architectures = list(getattr(config, "architectures", None) or [])
    family = next((SUPPORTED_ARCHITECTURES[a] for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
    if family is None:
        raise ValueError(
            f"teacher architecture {architectures or config.model_type!r} is not supported; "
            f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", family == "mistral"):
        raise ValueError(
            f"teacher uses sliding-window attention (sliding_window={window}); the student's MLA attends over the "
            "whole context, so only full-attention teachers are supported"
        )
    heads = config.num_attention_heads
    bias = bool(getattr(config, "attention_bias", False))
    return TeacherSpec(
        family=family,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        hidden_act=config.hidden_act,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters=_rope_parameters(config),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or bias,  # Qwen2 always has q/k/v biases; Llama/Mistral by attention_bias
        o_bias=bias and family != "qwen2",
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        qk_norm=family == "qwen3",
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


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
    from .gguf import find_gguf, materialize_gguf_teacher

    gguf = find_gguf(name_or_path)
    if gguf is None:
        return name_or_path
    return str(materialize_gguf_teacher(gguf, cache_root, name_or_path=name_or_path))


def load_teacher_config(name_or_path: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The teacher's config (Hub id, local dir or GGUF), with a clear error for paths that hold no model. A GGUF's
    config comes from its metadata, without dequantizing (the same config its materialized directory gets)."""
    from .gguf import find_gguf, gguf_config

    gguf = find_gguf(name_or_path)
    if gguf is not None:
        return gguf_config(gguf, name_or_path=name_or_path)
    path = Path(name_or_path)
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"teacher.name_or_path={name_or_path!r} is a path without a config.json")
    return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


def load_teacher(
    name_or_path: str,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, TeacherSpec]:
    """Load a supported teacher frozen in eval mode; the architecture is checked before the weights. A GGUF teacher
    loads from its materialized directory (`resolve_teacher_path`)."""
    name_or_path = resolve_teacher_path(name_or_path)
    spec = describe_teacher(load_teacher_config(name_or_path, trust_remote_code))
    check_weight_files(name_or_path)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        )
    except Exception as e:  # damaged weights, a missing shard, a download that failed: one line naming the teacher
        raise TeacherLoadError(
            f"teacher.name_or_path={name_or_path!r}: cannot load the weights ({type(e).__name__}: {first_line(e)})"
        ) from e
    model.to(device).eval().requires_grad_(False)
    return model, spec
