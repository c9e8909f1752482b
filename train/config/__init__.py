"""The typed configuration of `python -m train`.

schema.py   the dataclasses (one per setting group; the code runs on them), stored in Hydra's ConfigStore
compose.py  Hydra's compose API for tests and tools, and one-line composition errors
validate.py `typed_config` (composed config -> TrainConfig) and `validate_config` (values, stage order, the student
            against the teacher's shape), before any model loads
student.py  the student group: convert_teacher's keyword arguments, calibration rows, checks against the teacher
teacher.py  the teacher's shape as the checks see it (tiny, GGUF metadata, config.json), and `teacher.*` checks
errors.py   ConfigError: one line naming the key, the bad value and what is allowed
"""

from .compose import CONF_DIR, compose_config, composition_message
from .errors import ConfigError
from .schema import (
    TINY_TEACHER,
    DPOConfig,
    ILDConfig,
    KDConfig,
    MambaSettings,
    MLASettings,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    TrainingSchedule,
)
from .student import calibration_rows, student_init_kwargs
from .teacher import is_hub_id, teacher_spec, tiny_teacher_positions
from .validate import check_output_dir, check_stages, typed_config, validate_config

__all__ = [
    "CONF_DIR",
    "calibration_rows",
    "ConfigError",
    "DPOConfig",
    "ILDConfig",
    "KDConfig",
    "MLASettings",
    "MambaSettings",
    "StudentConfig",
    "TINY_TEACHER",
    "TeacherConfig",
    "TrainConfig",
    "TrainingSchedule",
    "check_output_dir",
    "check_stages",
    "compose_config",
    "composition_message",
    "is_hub_id",
    "student_init_kwargs",
    "teacher_spec",
    "tiny_teacher_positions",
    "typed_config",
    "validate_config",
]
