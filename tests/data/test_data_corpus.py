"""The embedded corpus and tokenizer: ship offline, regenerate byte for byte, teach a tiny teacher fast."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from data.config import DataConfig, SourceConfig
from data.corpus import tiny_chat_path, tiny_corpus_path, tiny_tokenizer_path
from data.corpus.generate import generate
from data.corpus.tokenizer_train import train_tokenizer
from data.datamodule import DistillDataModule
from data.sources import load_source
from models.teachers import adapter_for


def _rows(path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def test_tokenizer_loads_offline_with_specials_and_chat_template():
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_path()))
    assert len(tok) == 1024
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    text = "Grüße, 東京! tab\there ✓ 12 + 7 = 19"  # byte level: anything round-trips, no unknown token
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    chat = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
    assert rendered == "<|bos|><|user|>\nHi?<|end|>\n<|assistant|>\nHello.<|end|>\n"
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<|user|>")]


def test_shipped_files_regenerate_byte_for_byte(tmp_path):
    docs, chats = generate()
    assert _rows(tiny_corpus_path()) == docs
    assert _rows(tiny_chat_path()) == chats
    texts = [d["text"] for d in docs] + [m["content"] for c in chats for m in c["messages"]]
    train_tokenizer(texts, tmp_path / "tok")
    shipped = tiny_tokenizer_path() / "tokenizer.json"
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == shipped.read_bytes()
    size = sum(p.stat().st_size for p in tiny_corpus_path().parent.rglob("*") if p.is_file())
    assert size < 1_000_000  # the whole data/corpus folder stays small


def test_corpus_content_is_varied():
    docs = [d["text"] for d in _rows(tiny_corpus_path())]
    assert len(docs) == 9000 and len(set(docs)) > 8500
    for marker in (" = ", "Q: ", "Counting by", "morning,", "capital of", "taller than"):
        assert sum(marker in d for d in docs) > 200, marker


def test_tiny_teacher_learns_from_the_corpus_within_seconds(shared_cache):
    """About 4 s of CPU training takes a 0.17M-parameter Llama from 6.9 nats/token to well under 3."""
    cfg = DataConfig(seq_len=128, micro_batch_size=8, num_workers=0, cache_dir=shared_cache, eval_max_rows=16)
    dm = DistillDataModule(cfg, phase="kd")
    dm.setup()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        LlamaConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=192,
            vocab_size=len(dm.tokenizer),
            max_position_embeddings=256,
            tie_word_embeddings=True,
        )
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def inputs(batch: dict) -> dict:
        return adapter_for(model).forward_inputs(model, batch)

    def eval_loss() -> float:
        with torch.no_grad():
            losses = [model(**inputs(b), labels=b["labels"]).loss.item() for b in dm.val_dataloader()]
        return sum(losses) / len(losses)

    before = eval_loss()
    it = iter(dm.train_dataloader())
    for _ in range(80):
        batch = dm.record_consumed(next(it))
        model(**inputs(batch), labels=batch["labels"]).loss.backward()
        opt.step()
        opt.zero_grad()
    after = eval_loss()
    print(f"tiny teacher eval loss {before:.2f} -> {after:.2f} nats/token after 80 steps")
    assert before > 6.5 and after < 3.0
    assert dm.state_dict()["phases"]["kd"]["consumed"] == 80 * 8


@pytest.mark.parametrize("path", [tiny_corpus_path(), tiny_chat_path()])
def test_corpus_files_load_through_the_pipeline(path, tokenizer, shared_cache):
    src = load_source(SourceConfig(str(path)), shared_cache)
    assert src.kind == ("chat" if "chat" in path.name else "text") and len(src.dataset) in (9000, 3000)
