"""One redaction for everything shapline writes: artifacts, tags, params, logs, errors, events, the CLI.

Whatever a user types that looks like a credential is replaced by `***` before it leaves the process:
the user:password part of a URL, credential-like query parameters (X-Amz-Signature, token, ...),
`password=...`-style pairs, AWS access key ids, and the values of secret-looking environment variables
(AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, MLFLOW_TRACKING_PASSWORD, ...) wherever they appear.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from shapline.tasks.common.environment import environment

MASK = "***"

_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/\s@?#'\"]+)@")
_CREDENTIAL_NAMES = (
    r"x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|access_token|"
    r"refresh_token|id_token|api_key|apikey|api-key|password|passwd|pwd|secret|client_secret|"
    r"auth|authorization|credentials?|session_token|sas"
)
_QUERY = re.compile(rf"(?P<name>[?&;](?:{_CREDENTIAL_NAMES})=)(?P<value>[^&\s#'\"]*)", re.IGNORECASE)
_PAIR = re.compile(
    r"(?P<name>\b(?:aws_secret_access_key|aws_session_token|secret_access_key|session_token|password|"
    r"passwd|api_key|client_secret|token|secret)\b)(?P<sep>\s*[:=]\s*)(?P<quote>['\"]?)"
    r"(?P<value>[^\s'\",;&}]+)",
    re.IGNORECASE,
)
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA)[A-Z0-9]{16}\b")
_SECRET_VARIABLE = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|API_KEY|CREDENTIAL", re.IGNORECASE)
# Shorter values are too likely to be ordinary words (a test's AWS_SECRET_ACCESS_KEY=testing).
_MIN_SECRET_CHARS = 8


def _secret_values() -> list[str]:
    """Values of secret-looking environment variables, longest first (one may contain another)."""
    values = {
        value
        for name, value in environment().items()
        if _SECRET_VARIABLE.search(name) and len(value) >= _MIN_SECRET_CHARS
    }
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """The text with anything that looks like a credential replaced by ***."""
    if not text:
        return text
    for value in _secret_values():
        text = text.replace(value, MASK)
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _QUERY.sub(lambda m: f"{m['name']}{MASK}", text)
    text = _PAIR.sub(lambda m: f"{m['name']}{m['sep']}{m['quote']}{MASK}", text)
    return _AWS_KEY_ID.sub(MASK, text)


def redact_value(value: Any) -> Any:
    """redact() applied to every string inside a JSON-like value (dicts, lists, tuples)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(item) for item in value)
    return value


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's message and traceback before any handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logger's problem; leave it as it is
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
            record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_FILTER = RedactingFilter()


def redact_logs() -> None:
    """Put the redacting filter on every handler that exists now (Prefect's API and console handlers
    included), so no log line leaves this process unredacted; idempotent."""
    loggers = [
        logging.getLogger(),
        *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict)),
    ]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
    if logging.lastResort is not None and _FILTER not in logging.lastResort.filters:
        logging.lastResort.addFilter(_FILTER)
