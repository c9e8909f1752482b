"""Initialize a hybrid student from a teacher: MLA by SVD, Mamba2 from attention, the trunk copied."""

from ..mixer_mla import energy_rank
from .report import InitReport
from .student_config import build_student_config, parse_mla_layers, student_mixer_types
from .transfer import convert_teacher

__all__ = [
    "InitReport",
    "build_student_config",
    "convert_teacher",
    "energy_rank",
    "parse_mla_layers",
    "student_mixer_types",
]
