"""A separate KD teacher (`kd.teacher_name_or_path`) must read the token ids the data is tokenized into: the same
token at every id both vocabularies have, and the same special tokens. Only its embedding rows may differ (a padded
vocabulary, e.g. Qwen2.5-0.5B's 151936 rows vs 7B's 152064 over one tokenizer): KD then runs on the shared rows.

Checked from tokenizer files alone, before any weights load: at validation when both tokenizers are at hand (local
directories, the tiny teacher's, Hub ids once their files are fetched), and again by the KD stage before it loads the
KD teacher (GGUF teachers carry their tokenizer inside the file; their directory exists only then).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from .errors import ConfigError, choice, fail
from .schema import DTYPES, TINY_TEACHER, RopeScalingConfig, TrainConfig

SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")


def tokenizer_difference(a: Any, b: Any) -> str | None:
    """The first difference between two tokenizers (the lowest id whose token differs, a token at two different ids,
    or a special token), or None when they agree on every shared id and token."""
    vocab_a, vocab_b = a.get_vocab(), b.get_vocab()
    by_id_a = {i: t for t, i in vocab_a.items()}
    by_id_b = {i: t for t, i in vocab_b.items()}
    for i in sorted(by_id_a.keys() & by_id_b.keys()):
        if by_id_a[i] != by_id_b[i]:
            return f"id {i} is {by_id_a[i]!r} vs {by_id_b[i]!r}"
    # Same tokens at the shared ids; a token both have must then also sit at one id (one side may hold it twice).
    for token in sorted(vocab_a.keys() & vocab_b.keys(), key=vocab_a.get):
        if vocab_a[token] != vocab_b[token]:
            return f"token {token!r} is id {vocab_a[token]} vs {vocab_b[token]}"
    for role in SPECIAL_ROLES:
        ta, tb = getattr(a, role, None), getattr(b, role, None)
        if ta != tb:
            return f"{role} is {ta!r} vs {tb!r}"
    return None


def check_same_tokenizer(data_tokenizer: Any, kd_tokenizer: Any, teacher: str, kd_teacher: str) -> None:
    """ConfigError, one line naming both teachers and the first differing token, unless they agree."""
    difference = tokenizer_difference(data_tokenizer, kd_tokenizer)
    if difference is not None:
        raise ConfigError(
            f"kd.teacher_name_or_path={kd_teacher!r} does not share the tokenizer of teacher.name_or_path="
            f"{teacher!r} (the ids the data is tokenized into): {difference}; KD needs one tokenizer (a KD teacher of "
            "the same family, e.g. Llama-3.2-1B -> Llama-3.1-8B), or set kd.teacher_name_or_path=null"
        )


def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, trust_remote_code=False)


def data_tokenizer_source(cfg: TrainConfig, fetch: bool) -> str | None:
    """Where the tokenizer the data uses can be read without weights: data.tokenizer, the tiny teacher's, a local
    teacher directory, or (with `fetch`) a Hub id; None when only the pipeline can tell (GGUF, Hub without fetch)."""
    from data.corpus import tiny_tokenizer_path

    if cfg.data.tokenizer is not None:
        return cfg.data.tokenizer
    if cfg.teacher.name_or_path == TINY_TEACHER:
        return str(tiny_tokenizer_path())
    return _readable(cfg.teacher.name_or_path, fetch)


def _readable(name: str, fetch: bool) -> str | None:
    from models.gguf import find_gguf

    path = Path(name).expanduser()
    if path.exists():
        return None if find_gguf(str(path)) is not None else str(path)
    return name if fetch else None


def check_kd_teacher(cfg: TrainConfig, fetch: bool = False) -> None:
    """`kd.teacher_name_or_path` (its path, family and weight headers, as `teacher.*` is checked), `kd.teacher_dtype`,
    and its tokenizer against the data's, before any weights load."""
    kd = cfg.kd
    if kd.teacher_dtype is not None:
        choice("kd.teacher_dtype", kd.teacher_dtype, DTYPES)
    name = kd.teacher_name_or_path
    if name is None:
        return
    from .teacher import is_hub_id, teacher_spec

    if name == TINY_TEACHER or (not Path(name).expanduser().exists() and not is_hub_id(name)):
        fail("kd.teacher_name_or_path", name, "null, an existing local directory, a .gguf file or a Hub id 'org/name'")
    try:
        teacher_spec(replace(cfg.teacher, name_or_path=name, rope_scaling=RopeScalingConfig()), fetch=fetch)
    except ConfigError as e:  # the teacher checks name teacher.name_or_path; here it is the KD teacher's key
        raise ConfigError(str(e).replace("teacher.name_or_path=", "kd.teacher_name_or_path=", 1)) from e
    source, kd_source = data_tokenizer_source(cfg, fetch), _readable(name, fetch)
    if source is None or kd_source is None:
        return
    try:
        tokenizers = load_tokenizer(source), load_tokenizer(kd_source)
    except (OSError, ValueError) as e:
        from .errors import one_line

        raise ConfigError(f"kd.teacher_name_or_path={name!r}: its tokenizer cannot be read ({one_line(e)})") from e
    check_same_tokenizer(*tokenizers, cfg.teacher.name_or_path, name)
