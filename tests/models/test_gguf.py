"""GGUF teachers without the 98 MB file: tiny GGUFs written here with the gguf package, the way llama.cpp's converter
writes a Hugging Face Llama, then dequantized, cached and loaded through models/gguf.py; and every error path."""

from __future__ import annotations

import json
import shutil
import sys

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers.convert_slow_tokenizer import bytes_to_unicode

import models.gguf as gguf_module
from models.gguf import find_gguf, gguf_config, materialize_gguf_teacher
from models.sizes import TINY_LLAMA
from models.teachers import TeacherLoadError, describe_teacher, load_teacher, resolve_teacher_path
from train.config import ConfigError, compose_config, validate_config

from .tiny import rel_err

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = SPECIALS + list(bytes_to_unicode().values()) + ["th", "the"]  # byte-level BPE with two merges
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _permute(w, n_head: int):
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute: Q/K rows reordered for its RoPE (transformers undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path, quant=None, tied=True, extra=None):
    """A 2-layer GQA Llama (4 heads, 2 KV heads) written as a GGUF; returns the source model. `quant`: the ggml
    type of the matrices (None: float32, exact); `extra(writer)` adds metadata or tensors."""
    config = LlamaConfig(
        **{**TINY_LLAMA, "vocab_size": len(TOKENS), "num_hidden_layers": 2, "max_position_embeddings": 256}
        | {"tie_word_embeddings": tied, "rms_norm_eps": 1e-5},
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norm weights away from 1, so a dropped or misplaced norm shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_block_count(2)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(16)
    w.add_vocab_size(len(TOKENS))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))  # 3: control
    w.add_token_merges(["t h", "th e"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_chat_template(CHAT)
    if extra is not None:
        extra(w)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    def add(name, array):
        if quant is not None and array.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(array, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, array)

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], 4))
        add(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], 2))
        add(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        add(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    if not tied:
        add("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def write_metadata_only_gguf(path, arch: str) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _ids(tokenizer):
    return tokenizer("the cat sat there, then the dog", return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("quant", [None, gguf.GGMLQuantizationType.Q8_0], ids=["f32", "q8_0"])
def test_materialized_directory_matches_the_gguf_and_its_source(tmp_path, quant):
    path = tmp_path / "tiny.gguf"
    source = write_tiny_llama_gguf(path, quant=quant, tied=quant is None)
    folder = materialize_gguf_teacher(path, tmp_path / "cache")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] == (quant is None)
    assert (folder / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template == CHAT
    direct_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ids = _ids(tokenizer)
    assert torch.equal(ids, _ids(direct_tokenizer)) and 260 in ids  # the "th e" merge applied
    teacher, spec = load_teacher(str(folder))
    direct = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        got, expected, original = teacher(ids).logits, direct(ids).logits, source(ids).logits
    assert torch.equal(got, expected)  # the same dequantized float32 weights, saved and reloaded
    err = rel_err(got, original)
    print(f"{'q8_0' if quant else 'f32'}: materialized vs source model logits rel err {err:.1e}")
    assert err < 1e-6 if quant is None else 1e-4 < err < 5e-2  # f32 is exact; Q8_0 really was dequantized
    assert spec == describe_teacher(gguf_config(path))  # validation's spec is the loaded teacher's


def test_cache_is_reused_and_keyed_by_content(tmp_path):
    path = tmp_path / "a" / "tiny.gguf"
    path.parent.mkdir()
    write_tiny_llama_gguf(path)
    cache = tmp_path / "cache"
    folder = materialize_gguf_teacher(path, cache)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert materialize_gguf_teacher(path, cache) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not written again
    copy = tmp_path / "b" / "renamed.gguf"  # same bytes under another name: the same teacher
    copy.parent.mkdir()
    shutil.copy(path, copy)
    assert materialize_gguf_teacher(copy, cache) == folder
    # a directory holding one .gguf and no config.json resolves like the file; the env var moves the cache
    assert resolve_teacher_path(str(path.parent), cache) == str(folder)
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no temporary folders left behind
    assert json.loads((folder / "gguf_source.json").read_text())["sha256"] == folder.name


def test_default_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEBRA_DISTILL_CACHE", str(tmp_path / "zd"))
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path)
    folder = resolve_teacher_path(str(path))
    assert folder.startswith(str(tmp_path / "zd" / "gguf"))
    teacher, spec = load_teacher(str(path))  # load_teacher takes the .gguf itself too
    assert spec.num_layers == 2 and spec.num_kv_heads == 2 and spec.tie_word_embeddings


def test_a_concurrent_writer_that_finished_first_wins(tmp_path, monkeypatch):
    """Two jobs materialize the same file: the one that publishes second keeps the first one's folder."""
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path)
    other = materialize_gguf_teacher(path, tmp_path / "other_cache")
    (other / "winner").write_text("published first")
    cache = tmp_path / "cache"
    write = gguf_module._write_hf_directory

    def write_then_lose_the_race(gguf_path, out, *args):
        write(gguf_path, out, *args)
        shutil.copytree(other, cache / other.name)  # the other writer renames its folder into place meanwhile

    monkeypatch.setattr(gguf_module, "_write_hf_directory", write_then_lose_the_race)
    folder = materialize_gguf_teacher(path, cache)
    assert (folder / "winner").read_text() == "published first"
    assert [p.name for p in cache.iterdir()] == [folder.name]


def test_find_gguf(tmp_path):
    assert find_gguf("tiny") is None and find_gguf("HuggingFaceTB/SmolLM2-135M-Instruct") is None
    write_tiny_llama_gguf(tmp_path / "model.gguf")
    assert find_gguf(str(tmp_path)) == tmp_path / "model.gguf"
    (tmp_path / "config.json").write_text("{}")  # a Hugging Face directory wins over a .gguf beside it
    assert find_gguf(str(tmp_path)) is None
    renamed = tmp_path / "model.q8"  # the magic bytes count, not the name
    shutil.copy(tmp_path / "model.gguf", renamed)
    assert find_gguf(str(renamed)) == renamed
    with pytest.raises(FileNotFoundError, match=r"teacher.name_or_path='.*missing.gguf': no such .gguf file"):
        find_gguf(str(tmp_path / "missing.gguf"))


def _config_error(name_or_path) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(compose_config([f"teacher.name_or_path={name_or_path}"]))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"teacher.name_or_path='{name_or_path}'")
    return message


def test_not_a_gguf_file(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip archive, not a GGUF")
    with pytest.raises(TeacherLoadError, match="model.gguf is not a GGUF file"):
        gguf_config(fake)
    assert "is not a GGUF file" in _config_error(fake)
    with pytest.raises(TeacherLoadError, match="is not a GGUF file"):
        load_teacher(str(fake))


def test_directory_with_two_gguf_files(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"holds 2 .gguf files \(a.gguf, b.gguf\); point teacher.name_or_path"):
        find_gguf(str(tmp_path))
    assert "a.gguf, b.gguf" in _config_error(tmp_path)


def test_missing_gguf_file_fails_validation(tmp_path):
    assert "no such .gguf file" in _config_error(tmp_path / "nope.gguf")


def test_gguf_package_missing(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path)
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(TeacherLoadError, match=r"needs the gguf package: pip install gguf"):
        gguf_config(path)
    assert "pip install gguf" in _config_error(path)


@pytest.mark.parametrize("arch", ["gemma2", "phi3", "rwkv6"])
def test_unsupported_architecture(tmp_path, arch):
    path = tmp_path / f"{arch}.gguf"
    write_metadata_only_gguf(path, arch)
    with pytest.raises(TeacherLoadError, match=rf"GGUF architecture '{arch}' is not supported; supported: \["):
        materialize_gguf_teacher(path, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # refused before anything was written
    assert f"'{arch}' is not supported" in _config_error(path)


def test_scaled_rope_and_split_files_are_refused(tmp_path):
    """Llama 3.x GGUFs carry their RoPE scaling as a rope_freqs tensor, which transformers' loader drops."""
    scaled = tmp_path / "llama3.gguf"
    write_tiny_llama_gguf(scaled, extra=lambda w: w.add_tensor("rope_freqs.weight", torch.ones(8).numpy()))
    with pytest.raises(TeacherLoadError, match="scaled RoPE .*use the model's Hugging Face checkpoint"):
        gguf_config(scaled)
    split = tmp_path / "part-00001-of-00002.gguf"
    write_tiny_llama_gguf(split, extra=lambda w: w.add_uint16("split.count", 2))
    with pytest.raises(TeacherLoadError, match="one of 2 split GGUF parts; merge them"):
        gguf_config(split)


def test_damaged_header(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path)
    path.write_bytes(path.read_bytes()[:300])  # cut inside the metadata
    with pytest.raises(TeacherLoadError, match="damaged GGUF header"):
        gguf_config(path)


def test_gguf_teacher_validates_the_student_against_its_shape(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path)
    dims = ["qk_rope_head_dim=8", "qk_nope_head_dim=8", "v_head_dim=16"]
    overrides = [f"student.mla.{d}" for d in dims] + ["student.mamba.d_state=16", "student.mamba.headdim=16"]
    validate_config(compose_config([f"teacher.name_or_path={path}", "student.mla_layers=[0]", *overrides]))
    with pytest.raises(ConfigError, match=r"student.mla_layers has \[2\] outside the teacher's layers: .* 0..1"):
        validate_config(compose_config([f"teacher.name_or_path={path}", *overrides]))  # the tiny preset's [0, 2]
    with pytest.raises(ConfigError, match="student.mla"):  # the tiny preset's dims fit head_dim 32, not 16
        validate_config(compose_config([f"teacher.name_or_path={path}", "student.mla_layers=[0]"]))
