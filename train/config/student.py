"""The `student` group: the keyword arguments of models.init.convert_teacher it gives, the resolved number of
calibration rows, and its checks against the teacher's shape (validate_config calls `check_student`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, at_least, between, choice, fail, one_line
from .schema import StudentConfig, TrainConfig

if TYPE_CHECKING:
    from models.teachers import TeacherSpec


def student_init_kwargs(student: StudentConfig) -> dict[str, Any]:
    """Keyword arguments of `models.init.convert_teacher` from `student` (build_student_config takes the same
    minus rope_pairs / conv_init / mixer_init): per mixer kind its settings (`student.<kind>`, the kind's config
    dataclass) without the init-only keys and with None values dropped, so the teacher-derived defaults (biases,
    qk_norm, Mamba head sizes) apply; the layer map from `student.layers` or `student.mla_layers`."""
    from models.mixers import MIXERS

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
    if student.layers is not None:  # the general map; validate_config refuses it beside a non-default mla_layers
        layers = dict(student.layers) if isinstance(student.layers, Mapping) else list(student.layers)
        return {"mla_layers": None, "mixer_types": layers, **settings, **extra}
    layers = student.mla_layers
    return {"mla_layers": list(layers) if isinstance(layers, (list, tuple)) else layers, **settings, **extra}


DEFAULT_CALIBRATION_ROWS = 8


def _calibration_conflict(cfg: TrainConfig) -> str | None:
    """Why the init stage cannot calibrate this run, or None."""
    if cfg.teacher.shard:
        return "teacher.shard=true (calibration runs the whole teacher on one device)"
    if cfg.student.mixer_init != "attention":
        return f"student.mixer_init={cfg.student.mixer_init!r} (only mixers initialized from attention are fitted)"
    if cfg.data.ild_fraction == 0:
        return "data.ild_fraction=0 (calibration reads the first rows of the ILD stream)"
    return None


def calibration_rows(cfg: TrainConfig) -> int:
    """`student.calibration_rows` resolved: None is 8 rows, or 0 where the run cannot calibrate (teacher.shard,
    random mixers, no ILD data); check_student refuses an explicit count there."""
    rows = cfg.student.calibration_rows
    if rows is None:
        return 0 if _calibration_conflict(cfg) else DEFAULT_CALIBRATION_ROWS
    return rows


def check_student(cfg: TrainConfig, spec: TeacherSpec | None) -> None:
    """`student.*` values, then (with the teacher's shape) the student config init would build."""
    s = cfg.student
    if s.layers is not None:
        if s.mla_layers != StudentConfig.mla_layers:
            fail(
                "student.layers",
                s.layers,
                f"null while student.mla_layers={s.mla_layers!r} gives the map; to give it here, set "
                f"student.mla_layers={StudentConfig.mla_layers}",
            )
        if not isinstance(s.layers, (list, tuple, Mapping)):
            fail("student.layers", s.layers, "a list of one mixer kind per layer, or a map {layer: kind}")
    layers = s.mla_layers
    if isinstance(layers, str):
        choice("student.mla_layers", layers, ("all", "none", "smart"))
        if layers == "smart" and (s.num_mla_layers is None) == (s.kv_budget is None):
            fail(
                "student.num_mla_layers",
                s.num_mla_layers,
                "set exactly one of it and student.kv_budget with mla_layers=smart",
            )
        if s.kv_budget is not None:
            between("student.kv_budget", s.kv_budget, 0.0, 1.0, open_low=True)
    elif not isinstance(layers, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in layers
    ):
        fail("student.mla_layers", layers, "a list of layer indices, 'all' or 'none'")
    elif any(i < 0 for i in layers) or len(set(layers)) != len(layers):
        fail("student.mla_layers", list(layers), "distinct layer indices >= 0")
    from models import mixer_mamba2, mixer_mla

    choice("student.mla.rope_pairs", s.mla.rope_pairs, mixer_mla.ROPE_PAIRS)
    choice("student.mla.rope_heads", s.mla.rope_heads, mixer_mla.ROPE_HEADS)
    choice("student.mla.kv_up_layout", s.mla.kv_up_layout, mixer_mla.KV_UP_LAYOUTS)
    if s.mla.energy is not None:
        between("student.mla.energy", s.mla.energy, 0.0, 1.0, open_low=True)
    choice("student.mamba.conv_init", s.mamba.conv_init, mixer_mamba2.CONV_INITS)
    cpu = cfg.trainer.accelerator == "cpu"  # flex: FlexAttention has no CPU backward
    if s.document_masking not in ("auto", "dense", *(() if cpu else ("flex",))):
        fail("student.document_masking", s.document_masking, f"auto | dense | flex{' (flex not on cpu)' * cpu}")
    from models.init.transfer import MIXER_INITS

    choice("student.mixer_init", s.mixer_init, MIXER_INITS)
    if s.calibration_rows is not None:
        at_least("student.calibration_rows", s.calibration_rows, 0)
    if s.calibration_rows and (conflict := _calibration_conflict(cfg)):
        fail("student.calibration_rows", s.calibration_rows, f"0 or null with {conflict}")
    choice("student.mamba.gate_init", s.mamba.gate_init, mixer_mamba2.GATE_INITS)
    choice("student.mamba.layout", s.mamba.layout, mixer_mamba2.LAYOUTS)
    for key in ("d_conv", "chunk_size", "ngroups", "norm_groups"):
        at_least(f"student.mamba.{key}", getattr(s.mamba, key), 1)
    for key in ("dt_limit", "A_init_range"):
        if len(getattr(s.mamba, key)) != 2:
            fail(f"student.mamba.{key}", getattr(s.mamba, key), "two numbers [low, high]")
    if spec is None:
        return
    from models.init.student_config import build_student_config

    kwargs = student_init_kwargs(s)
    if kwargs.get("mixer_types") is not None:
        from models.mixers import check_mixer_types

        try:
            kwargs["mixer_types"] = check_mixer_types(kwargs["mixer_types"], spec.num_layers, "student.layers")
        except ValueError as e:
            raise ConfigError(str(e)) from e
    for init_only in ("rope_pairs", "conv_init", "mixer_init"):
        kwargs.pop(init_only)
    if kwargs["mla_layers"] == "smart":  # the map is chosen later; every layer must fit either mixer
        kwargs["mla_layers"] = "all"
        build_student_config(spec, **{**kwargs, "mla_layers": "none"})
    try:
        build_student_config(spec, **kwargs)
    except ValueError as e:
        msg = one_line(e)
        from models.mixers import MIXERS

        if msg.startswith(tuple(f"{kind}." for kind in MIXERS)):  # a kind's validate names keys without the group
            msg = "student." + msg
        raise ConfigError(msg) from e
