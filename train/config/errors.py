"""ConfigError and the one-line checks every config module uses: the key, the bad value, what is allowed."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line naming the key, the value and what is allowed."""


def one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf errors span lines and bury the cause; join the first line of each error in the chain."""
    options = getattr(exc, "options", None)
    missing = getattr(exc, "missing_cfg_file", None)
    if options and missing and "/" in missing:  # an unknown option of a config group, e.g. conf=nope
        group, name = missing.rsplit("/", 1)
        return f"{group}={name!r} is not an option of {group}; available: {', '.join(options)}"
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and "$" not in ln]
        if lines:
            key = next((ln for ln in lines if ln.startswith("full_key:")), None)
            first = lines[0].rstrip(".")
            parts.append(first + (f" ({key})" if key and key not in first else ""))
        exc = exc.__cause__ or exc.__context__
    return ": ".join(dict.fromkeys(parts))


def error_chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is invalid; allowed: {allowed}")


def choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        fail(key, value, " | ".join(map(str, allowed)))


def at_least(key: str, value: Any, low: float, integer: bool = True) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value >= low:
        fail(key, value, f"{'an integer' if integer else 'a number'} >= {low}")


def between(key: str, value: float, low: float, high: float, open_low: bool = False) -> None:
    ok = (low < value if open_low else low <= value) and value <= high
    if not ok:
        fail(key, value, f"a number in {'(' if open_low else '['}{low}, {high}]")
