"""Which adapter reads a teacher: keyed by Hugging Face model_type, found from a config's `architectures` (or,
when a config names none, its model_type) or a model's class, the way transformers' auto classes find models."""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from ..teacher_spec import TeacherSpec
from .adapter import TeacherAdapter
from .families import FAMILIES

ADAPTERS: dict[str, TeacherAdapter] = {adapter.family: adapter for adapter in FAMILIES}
SUPPORTED_ARCHITECTURES: dict[str, str] = {name: a.family for a in FAMILIES for name in a.architectures}


def _unsupported(what) -> ValueError:
    return ValueError(f"teacher architecture {what!r} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}")


def adapter_for_config(config: PretrainedConfig) -> TeacherAdapter:
    """The adapter of a teacher config; a one-line ValueError naming the supported architectures otherwise."""
    architectures = list(getattr(config, "architectures", None) or [])
    family = next((SUPPORTED_ARCHITECTURES[a] for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
    if family is None and not architectures:  # a config built in code names no architecture: its model_type
        family = getattr(config, "model_type", None) if getattr(config, "model_type", None) in ADAPTERS else None
    if family is None:
        raise _unsupported(architectures or getattr(config, "model_type", None))
    return ADAPTERS[family]


def adapter_for(model: nn.Module) -> TeacherAdapter:
    """The adapter of a loaded teacher: by its class (e.g. LlamaForCausalLM), else by its config."""
    family = SUPPORTED_ARCHITECTURES.get(type(model).__name__)
    if family is not None:
        return ADAPTERS[family]
    config = getattr(model, "config", None)
    if config is None:
        raise _unsupported(type(model).__name__)
    return adapter_for_config(config)


def describe_teacher(config: PretrainedConfig) -> TeacherSpec:
    """Check that the teacher is a supported GQA family and return what the student copies."""
    return adapter_for_config(config).describe(config)
