"""Teachers: the Hugging Face GQA causal LMs a student is distilled from, and the one place that reads them.

    adapter = adapter_for(teacher)              # or adapter_for_config(config), before any weight loads
    spec = adapter.describe(teacher.config)     # TeacherSpec: the shapes and quirks the student copies
    hidden = adapter.final_hidden(teacher, batch)  # packed batch: documents kept apart
    trace = adapter.capture(teacher, batch)     # per-layer inputs, attention outputs, outputs (ILD)

TeacherSpec (models/teacher_spec.py) and AttentionWeights (models/attention_weights.py) are flat files beside
the mixers that read them; adapter.py TeacherAdapter (the Hugging Face Llama layout); families.py Llama, Mistral,
Qwen2, Qwen3; registry.py ADAPTERS (by model_type), SUPPORTED_ARCHITECTURES, adapter_for(_config);
attention_weights.py per-head weights; capture.py the ILD trace; loading.py load/resolve/check a teacher.
"""

from ..attention_weights import AttentionWeights
from ..teacher_spec import TeacherSpec
from .adapter import TeacherAdapter
from .capture import TeacherTrace
from .loading import (
    TeacherLoadError,
    check_weight_files,
    load_teacher,
    load_teacher_config,
    resolve_teacher_path,
    sdpa_attention,
)
from .registry import ADAPTERS, SUPPORTED_ARCHITECTURES, adapter_for, adapter_for_config, describe_teacher

__all__ = [
    "ADAPTERS",
    "SUPPORTED_ARCHITECTURES",
    "AttentionWeights",
    "TeacherAdapter",
    "TeacherLoadError",
    "TeacherSpec",
    "TeacherTrace",
    "adapter_for",
    "adapter_for_config",
    "check_weight_files",
    "describe_teacher",
    "load_teacher",
    "load_teacher_config",
    "resolve_teacher_path",
    "sdpa_attention",
]
