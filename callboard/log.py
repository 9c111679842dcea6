"""Structured logging: one JSON object per line in production, readable lines in dev.

Every record carries its `extra` fields (job_id, room, worker_id, pid, ...). Anything that looks
like a JWT, and every secret registered with `redact_secret`, is replaced before output so that
tokens and API secrets never reach a log sink.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from typing import Any, Final, Literal

LogFormat = Literal["json", "pretty"]

ROOT_LOGGER: Final = "callboard"
REDACTED: Final = "[redacted]"
_JWT_RE: Final = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
_STANDARD_ATTRS: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)
_secrets: set[str] = set()


def get_logger(name: str) -> logging.Logger:
    """A logger under the `callboard` namespace."""
    return logging.getLogger(f"{ROOT_LOGGER}.{name}" if name else ROOT_LOGGER)


MIN_REDACTED_SECRET: Final = 8
"""Shorter secrets (the public dev pair's "secret") are words, not secrets: redacting them
would mangle ordinary text."""


def redact_secret(secret: str) -> None:
    """Register a secret that must never appear in any log line."""
    if len(secret) >= MIN_REDACTED_SECRET:
        _secrets.add(secret)


def redact(text: str) -> str:
    """Replace JWTs and registered secrets in `text`."""
    if "eyJ" in text:
        text = _JWT_RE.sub(REDACTED, text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


@contextlib.contextmanager
def root_logging_kept() -> Iterator[None]:
    """Put the root logger's handlers and level back afterwards, for code that installs its
    own (a job process's IPC handler, the CLI's handler in tests)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The `extra` fields a caller attached to a record."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, then the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(extra_fields(record))
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = record.stack_info
        return redact(json.dumps(out, default=str, ensure_ascii=False))


class PrettyFormatter(logging.Formatter):
    """Readable, optionally colored lines for `dev`: time level logger message key=value..."""

    _COLORS: Final = {
        "DEBUG": "\x1b[90m",
        "INFO": "\x1b[32m",
        "WARNING": "\x1b[33m",
        "ERROR": "\x1b[31m",
        "CRITICAL": "\x1b[1;31m",
    }

    def __init__(self, color: bool) -> None:
        super().__init__()
        self._color = color

    def format(self, record: logging.LogRecord) -> str:
        level = record.levelname
        if self._color:
            level = f"{self._COLORS.get(level, '')}{level:<7}\x1b[0m"
        fields = " ".join(f"{k}={v}" for k, v in extra_fields(record).items())
        line = f"{_iso_time(record.created)[11:23]} {level} {record.name}: {record.getMessage()}"
        if fields:
            line = f"{line}  {fields}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return redact(line)


def setup_logging(fmt: LogFormat = "json", level: int | str = logging.INFO) -> None:
    """Install one stderr handler on the root logger (idempotent: replaces ours)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(PrettyFormatter(color=sys.stderr.isatty()))
    handler.set_name("callboard")
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == "callboard":
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)


def _iso_time(created: float) -> str:
    millis = int((created % 1) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{millis:03d}Z"
