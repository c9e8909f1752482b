"""The teacher as the config sees it: its shape for the student checks (tiny, GGUF metadata, a local config.json,
or a Hub config when asked), without loading weights; and the checks of `teacher.*`."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

from .errors import ConfigError, at_least, choice, fail, one_line
from .schema import ATTN_IMPLEMENTATIONS, DTYPES, TEACHER_CHOICES, TINY_TEACHER, TeacherConfig, TrainConfig


def tiny_teacher_positions(tiny_seq_len: int, data_seq_len: int) -> int:
    """max_position_embeddings of the embedded teacher: it is built for the run, so it fits both the length it
    trains on (teacher.tiny.seq_len) and the run's data.seq_len."""
    return max(512, tiny_seq_len, data_seq_len)


def teacher_spec(teacher: TeacherConfig, vocab_size: int = 1024, fetch: bool = False, data_seq_len: int = 0):
    """The TeacherSpec used to check the student: from `teacher.tiny`, from a GGUF file's metadata (models/gguf.py,
    no dequantization), from a local config.json (whose safetensors headers are checked too), or for a Hub id None
    (shape checks wait for the pipeline) unless `fetch` (read its config.json from the Hub or the local HF cache).
    `vocab_size` only fills the tiny spec (no check uses it)."""
    from models.errors import first_line
    from models.gguf import find_gguf, gguf_config
    from models.teachers import TeacherSpec, describe_teacher
    from models.teachers.loading import apply_rope_scaling, check_weight_files, load_teacher_config

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
            return describe_teacher(
                apply_rope_scaling(gguf_config(gguf, name_or_path=name), teacher.rope_scaling.as_dict())
            )
    except (OSError, ValueError) as e:  # models/gguf.py's messages are whole: the first line, not the chain
        message = first_line(e)
        prefix = "" if message.startswith("teacher.") else f"teacher.name_or_path={name!r}: "
        raise ConfigError(prefix + message) from e
    path = Path(name).expanduser()
    if path.exists():
        try:
            spec = describe_teacher(
                load_teacher_config(str(path), teacher.trust_remote_code, teacher.rope_scaling.as_dict())
            )
            check_weight_files(str(path), required=False)
            return spec
        except (OSError, ValueError) as e:
            message = _remote_code_message(e, name) or one_line(e)
            raise ConfigError(
                message if message.startswith("teacher.") else f"teacher.name_or_path={name!r}: {message}"
            ) from e
    if not is_hub_id(name):
        fail("teacher.name_or_path", name, TEACHER_CHOICES)
    if not fetch:
        return None
    try:
        return describe_teacher(load_teacher_config(name, teacher.trust_remote_code, teacher.rope_scaling.as_dict()))
    except (OSError, ValueError) as e:
        if (message := _remote_code_message(e, name)) is not None:
            raise ConfigError(message) from e
        raise ConfigError(
            f"teacher.name_or_path={name!r} is not a local directory and its config could not be read from the "
            f"Hub: {one_line(e)}"
        ) from e


def check_teacher_tokenizer(cfg: TrainConfig) -> None:
    """A local teacher directory must hold its tokenizer unless data.tokenizer names one (a GGUF carries its own);
    checked after the teacher itself (a folder that is no model at all is told so first)."""
    from models.gguf import find_gguf

    path = Path(cfg.teacher.name_or_path).expanduser()
    if cfg.data.tokenizer is not None or not path.is_dir() or find_gguf(str(path)) is not None:
        return
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        fail(
            "teacher.name_or_path",
            cfg.teacher.name_or_path,
            f"a directory with the teacher's tokenizer ({' / '.join(TOKENIZER_FILES)}: none is there); copy them "
            "from where the model came from, or set data.tokenizer",
        )


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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_teacher(cfg: TrainConfig) -> None:
    t = cfg.teacher
    if not t.name_or_path:
        fail("teacher.name_or_path", t.name_or_path, TEACHER_CHOICES)
    choice("teacher.dtype", t.dtype, DTYPES)
    choice("teacher.attn_implementation", t.attn_implementation, ATTN_IMPLEMENTATIONS)
    st = cfg.strategy
    if t.shard and not (str(st.name).startswith("deepspeed") and getattr(st, "stage", None) == 3):
        # Only a ZeRO-3 engine partitions parameters and gathers them per module in forward.
        stage = f", strategy.stage={st.stage}" if hasattr(st, "stage") else ""
        fail("teacher.shard", True, f"false unless the strategy is DeepSpeed ZeRO-3 (strategy={st.name}{stage})")
    scaling = {k: v for k, v in asdict(t.rope_scaling).items() if v is not None}
    if scaling:
        from models.teachers.loading import check_rope_scaling

        if t.name_or_path == TINY_TEACHER:
            fail("teacher.rope_scaling", scaling, "unset with the tiny teacher (built for data.seq_len)")
        try:
            check_rope_scaling(scaling)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    if t.name_or_path == TINY_TEACHER:
        tiny = t.tiny
        for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "batch_size"):
            at_least(f"teacher.tiny.{key}", getattr(tiny, key), 1)
        at_least("teacher.tiny.train_steps", tiny.train_steps, 0)
        at_least("teacher.tiny.seq_len", tiny.seq_len, 2)
        if not tiny.lr > 0:
            fail("teacher.tiny.lr", tiny.lr, "a number > 0")
        if tiny.hidden_size % tiny.num_heads or (tiny.hidden_size // tiny.num_heads) % 2:
            fail(
                "teacher.tiny.num_heads",
                tiny.num_heads,
                f"a divisor of hidden_size={tiny.hidden_size} giving an even head_dim",
            )
        if tiny.num_heads % tiny.num_kv_heads:
            fail("teacher.tiny.num_kv_heads", tiny.num_kv_heads, f"a divisor of num_heads={tiny.num_heads}")
