"""Chat data: the template renders it, the loss mask covers exactly the assistant turns."""

from __future__ import annotations

import pytest

from data.chat import check_messages, mask_from_spans, render_chat
from data.config import DataConfig
from data.sources import DataSourceError, LoadedSource
from data.tokenize import tokenize_source

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Where does Mira live?"},
    {"role": "assistant", "content": "Mira lives in Tolem."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 is 5."},
]
# A Llama-3 style template (header tokens, eot after each turn), on the tiny vocabulary.
LLAMA3_STYLE = (
    "{{- bos_token }}{%- for m in messages %}"
    "{{- '<|system|>' + m['role'] + '<|end|>\n\n' + m['content'] | trim + '<|eos|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|system|>assistant<|end|>\n\n' }}{%- endif %}"
)


def _tokenized(tokenizer, rows, mask_prompt=True):
    import datasets

    src = LoadedSource("chat.jsonl", "chat", datasets.Dataset.from_dict({"messages": rows}))
    return tokenize_source(src, tokenizer, DataConfig(mask_prompt=mask_prompt))


@pytest.mark.parametrize("template", ["shipped", "llama3_style"])
def test_loss_mask_is_exactly_the_assistant_turns(template, tokenizer):
    tok = tokenizer
    if template == "llama3_style":
        tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
        tok.chat_template = LLAMA3_STYLE
    row = _tokenized(tok, [CHAT])[0]
    ids, mask = row["input_ids"], row["loss_mask"]
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    end = "<|end|>\n" if template == "shipped" else "<|eos|>"
    assert trained == f"Mira lives in Tolem.{end}2 plus 3 is 5.{end}"
    assert tok.decode(ids) == tok.apply_chat_template(CHAT, tokenize=False)
    assert ids[0] == tok.bos_token_id and not mask[0]


def test_mask_prompt_false_trains_every_token(tokenizer):
    row = _tokenized(tokenizer, [CHAT], mask_prompt=False)[0]
    assert all(row["loss_mask"]) and len(row["loss_mask"]) == len(row["input_ids"]) > 20


def test_template_that_is_not_prefix_stable_is_refused(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    # Renders the last message differently from earlier ones: prefixes are not prefixes of the whole.
    tok.chat_template = (
        "{% for m in messages %}{% if loop.last %}[{{ m.content }}]{% else %}{{ m.content }}{% endif %}{% endfor %}"
    )
    with pytest.raises(DataSourceError, match=r"chat\.jsonl row 0.*does not render conversation prefixes"):
        _tokenized(tok, [CHAT])


def test_check_messages_drops_extra_keys_and_names_row():
    msgs = [{"role": "user", "content": "q", "name": None}, {"role": "assistant", "content": "a"}]
    assert check_messages(msgs, "x") == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    with pytest.raises(ValueError, match=r"^here: message 1 needs string 'role' and 'content'"):
        check_messages([{"role": "user", "content": "q"}, {"role": "assistant"}], "here")
    with pytest.raises(ValueError, match="non-empty list"):
        check_messages([], "here")


def test_render_spans_and_mask_from_spans(tokenizer):
    text, spans = render_chat(tokenizer, check_messages(CHAT, "x"), "x")
    assert [text[a:b] for a, b in spans] == ["Mira lives in Tolem.<|end|>\n", "2 plus 3 is 5.<|end|>\n"]
    assert mask_from_spans([(0, 2), (2, 5), (5, 7), (7, 9)], [(2, 5), (7, 8)]) == [False, True, False, True]
