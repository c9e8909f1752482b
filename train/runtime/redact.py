"""Secrets (HF_TOKEN, WANDB_API_KEY, any *TOKEN* / *API_KEY* / *SECRET* / *PASSWORD* variable of the environment)
never reach logs or error messages: `install()` puts a filter on every logging handler that replaces their values
with "***", and `redact(text)` does the same for what is printed directly. Configs and reports never read the
environment (no key of the schema holds a credential: libraries read them from the environment themselves).
"""

from __future__ import annotations

import logging
import os
import re

SECRET_NAME = re.compile(r"TOKEN|API_?KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
MIN_LENGTH = 8  # shorter values ("1", "true") are not credentials and would mask ordinary text


def secret_values() -> list[str]:
    """Values of secret-looking environment variables, longest first (so no partial replacement wins)."""
    values = {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= MIN_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(text: str, secrets: list[str] | None = None) -> str:
    for value in secret_values() if secrets is None else secrets:
        text = text.replace(value, "***")
    return text


class RedactingFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.secrets = secret_values()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            clean = redact(message, self.secrets)
            if clean != message:
                record.msg, record.args = clean, None
            if record.exc_info and not record.exc_text:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info), self.secrets)
            elif record.exc_text:
                record.exc_text = redact(record.exc_text, self.secrets)
        return True


def install() -> None:
    """Add the filter to every handler configured so far (root's, and libraries' own such as Lightning's)."""
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
