"""SmolLM2-135M-Instruct from its GGUF: the materialized directory is the teacher transformers loads from the file."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from models.gguf import gguf_config
from models.teachers import describe_teacher


def test_materialized_smollm2_matches_the_gguf(smollm2_gguf_file, smollm2_dir, smollm2, text_ids):
    teacher, spec, tokenizer = smollm2
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    shape = (spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.vocab_size)
    assert shape == (30, 576, 9, 3, 64, 49152) and spec.tie_word_embeddings
    assert spec == describe_teacher(gguf_config(smollm2_gguf_file))  # what validation saw is what loaded
    assert "<|im_start|>" in tokenizer.chat_template
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert chat.startswith("<|im_start|>system\n") and "<|im_start|>user\nHi<|im_end|>" in chat
    direct = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf_file.parent, gguf_file=smollm2_gguf_file.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        got, expected = teacher(text_ids).logits, direct(text_ids).logits
    print(f"materialized vs direct GGUF load: max |logit diff| {(got - expected).abs().max().item():.1e}")
    assert torch.equal(got, expected)  # the same float32 weights, saved and reloaded
