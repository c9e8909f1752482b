"""Chat rows: check their roles, render them with the tokenizer's chat template, locate assistant turns.

Assistant turns are found by rendering prefixes of the conversation: turn i spans from the end of
`template(messages[:i], add_generation_prompt=True)` to the end of `template(messages[:i+1])`, so the
span covers the assistant's content and its end-of-turn tokens (the model must learn to stop) but
not the role header. This needs a template whose renderings of prefixes are prefixes of the full
rendering (Llama 3, Mistral, Qwen2/2.5 and the tiny tokenizer's are); others raise a clear error.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """Validate one chat row and return it as plain {"role", "content"} dicts.

    `where` names the row in errors, e.g. "source data.jsonl row 12, field 'messages'".
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of {{'role', 'content'}} messages, got {messages!r:.80}")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {j} needs string 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: message {j} has role {m['role']!r}; expected one of {ROLES}")
        out.append({"role": m["role"], "content": m["content"]})
    roles = [m["role"] for m in out]
    if "assistant" not in roles or "user" not in roles[: roles.index("assistant")]:
        raise ValueError(f"{where}: needs a 'user' message followed by an 'assistant' message; roles are {roles}")
    return out


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], where: str
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) of its assistant turns."""
    if tokenizer.chat_template is None:
        raise ValueError(f"{where}: chat data needs a tokenizer with a chat template ({tokenizer.name_or_path})")

    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    text = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise ValueError(
                f"{where}: the chat template of {tokenizer.name_or_path} does not render conversation "
                f"prefixes as prefixes of the whole (turn {i}), so assistant tokens cannot be located; "
                "set mask_prompt=false or use a prefix-stable template"
            )
        spans.append((len(before), len(through)))
    return text, spans


def mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """True for tokens whose first character lies in one of the (sorted, disjoint) spans."""
    mask, k = [], 0
    for start, _ in offsets:
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        mask.append(k < len(spans) and spans[k][0] <= start)
    return mask
