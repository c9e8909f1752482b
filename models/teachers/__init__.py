"""Teachers: the Hugging Face GQA causal LMs a student is distilled from, and how to read them."""

from .attention_weights import AttentionWeights, attention_weights
from .loading import (
    SUPPORTED_ARCHITECTURES,
    TeacherLoadError,
    TeacherSpec,
    check_weight_files,
    describe_teacher,
    load_teacher,
    load_teacher_config,
    resolve_teacher_path,
)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "AttentionWeights",
    "TeacherLoadError",
    "TeacherSpec",
    "attention_weights",
    "check_weight_files",
    "describe_teacher",
    "load_teacher",
    "load_teacher_config",
    "resolve_teacher_path",
]
