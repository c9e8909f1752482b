"""One-line error messages: the project reports failures in one line naming the key or file involved."""

from __future__ import annotations


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (at most `limit` characters), or its type's name if it has none."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
