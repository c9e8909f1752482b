"""Composition through Hydra's compose API (tests, tools) and one-line messages for composition errors."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path

from omegaconf import DictConfig

from .errors import ConfigError, error_chain, one_line
from .schema import register_configs

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _override_value(overrides: list[str], key: str) -> str | None:
    for override in overrides:
        name, sep, value = override.lstrip("+~").partition("=")
        if sep and name == key:
            return value
    return None


def composition_message(exc: BaseException, overrides: list[str]) -> str:
    """One line for a Hydra / OmegaConf composition error: the override, the key, the bad value, what is allowed."""
    import difflib

    from hydra.errors import OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    for e in error_chain(exc):
        if isinstance(e, OverrideParseException):
            reason = str(e).strip().splitlines()[0] if str(e).strip() else "syntax error"
            return (
                f"cannot parse the override {e.override!r}: {reason}; write key=value, lists as key=[a,b], and quote "
                "values with spaces or special characters"
            )
        full_key = getattr(e, "full_key", None)
        if isinstance(e, (ConfigAttributeError, ConfigKeyError)) and full_key:
            schema = getattr(e, "object_type", None)
            allowed = sorted(f.name for f in fields(schema)) if schema is not None and is_dataclass(schema) else []
            parent = full_key.rpartition(".")[0]
            value = _override_value(overrides, full_key)
            message = f"{full_key}{'' if value is None else '=' + value} is not a config key"
            close = difflib.get_close_matches(str(e.key), allowed, n=1)
            if close:
                message += f" (did you mean {parent + '.' if parent else ''}{close[0]}?)"
            if allowed:
                message += f"; allowed {'in ' + parent if parent else 'at the top level'}: {', '.join(allowed)}"
            return message
        if full_key and hasattr(e, "msg"):  # any other OmegaConf error: a wrong type, a broken interpolation
            value = _override_value(overrides, full_key)
            reason = str(e.msg or e).strip().splitlines()[0]
            return f"{full_key}={value} is invalid: {reason}" if value is not None else f"{full_key}: {reason}"
    message = one_line(exc)
    if message.startswith("Ambiguous value"):
        message += ": write a list as key=[a,b], or quote a string with commas"
    return message


def compose_config(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose `conf/<config_name>.yaml` with Hydra overrides (e.g. ["conf=zebra_1b", "kd.lr=1e-4"]).

    Unknown presets, unknown keys and wrong types raise ConfigError (one line); the result is typed but not
    yet validated (call `validate_config`). Hydra's own `hydra:` node is not included.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        try:
            return compose(config_name=config_name, overrides=list(overrides or []))
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(composition_message(e, list(overrides or []))) from e
