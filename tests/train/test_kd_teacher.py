"""A separate KD teacher's tokenizer against the data's (train/config/tokenizers.py), on tokenizer files made here:
equal tokenizers pass, a padded embedding matrix over the same tokenizer passes and KD runs on the shared rows, one id
changed or another special token is refused with one line naming both teachers and the first differing token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from train.config import ConfigError, compose_config, validate_config
from train.config.tokenizers import load_tokenizer, tokenizer_difference
from train.stages.kd import shared_vocabulary

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far"]


def save_tokenizer(path: Path, words: list[str] = WORDS, eos: str = "</s>") -> Path:
    """A WordLevel tokenizer (<unk>, <s>, </s>, then `words` in order) saved as a transformers tokenizer folder."""
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", "<eot>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token=eos)
    tokenizer.save_pretrained(path)
    return path


def test_equal_tokenizers_agree(tmp_path):
    a, b = save_tokenizer(tmp_path / "a"), save_tokenizer(tmp_path / "b")
    assert tokenizer_difference(load_tokenizer(str(a)), load_tokenizer(str(b))) is None
    assert load_tokenizer(str(a))("the cat sat")["input_ids"] == [4, 5, 6]  # real files, real ids


def test_one_id_changed_or_another_special_token_is_the_first_difference(tmp_path):
    base = load_tokenizer(str(save_tokenizer(tmp_path / "a")))
    swapped = load_tokenizer(str(save_tokenizer(tmp_path / "b", ["the", "sat", "cat", *WORDS[3:]])))
    assert tokenizer_difference(base, swapped) == "id 5 is 'cat' vs 'sat'"
    other_eos = load_tokenizer(str(save_tokenizer(tmp_path / "c", eos="<eot>")))
    assert tokenizer_difference(base, other_eos) == "eos_token is '</s>' vs '<eot>'"
    # A larger vocabulary that keeps every id of the smaller one agrees on the shared ids.
    longer = load_tokenizer(str(save_tokenizer(tmp_path / "d", [*WORDS, "hat"])))
    assert tokenizer_difference(base, longer) is None


def _teacher_dir(path: Path, vocab_rows: int, tokenizer_words: list[str], hidden: int = 64) -> Path:
    """A config.json-only Llama teacher folder with its tokenizer (validation reads no weights)."""
    LlamaConfig(
        vocab_size=vocab_rows,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(path)
    save_tokenizer(path, tokenizer_words)
    return path


def _validate(teacher: Path, kd_teacher: Path):
    cfg = compose_config(
        [
            f"teacher.name_or_path={teacher}",
            f"kd.teacher_name_or_path={kd_teacher}",
            "student.mla.kv_lora_rank=16",
            "student.mla.qk_rope_head_dim=8",
            "student.mla.qk_nope_head_dim=8",
            "student.mla.v_head_dim=16",
            "student.mamba.d_state=16",
            "student.mamba.headdim=16",
            "data.seq_len=128",
        ]
    )
    return validate_config(cfg)


def test_validation_accepts_a_padded_kd_teacher_and_refuses_another_tokenizer(tmp_path):
    teacher = _teacher_dir(tmp_path / "small", 12, WORDS)
    padded = _teacher_dir(tmp_path / "big", 16, WORDS, hidden=96)  # the same tokenizer, 4 padding rows more
    assert _validate(teacher, padded).kd.teacher_name_or_path == str(padded)
    other = _teacher_dir(tmp_path / "other", 16, ["the", "sat", "cat", *WORDS[3:]], hidden=96)
    with pytest.raises(ConfigError) as error:
        _validate(teacher, other)
    message = str(error.value)
    assert "\n" not in message and str(other) in message and str(teacher) in message
    assert "id 5 is 'cat' vs 'sat'" in message


def test_kd_on_a_padded_teacher_uses_the_shared_rows():
    student_head, teacher_head = torch.randn(12, 8), torch.randn(16, 8)
    s, t = shared_vocabulary(student_head, teacher_head)
    assert torch.equal(s, student_head) and torch.equal(t, teacher_head[:12])
    same = torch.randn(12, 8)
    assert shared_vocabulary(student_head, same) == (student_head, same)  # equal rows: the tensors themselves
