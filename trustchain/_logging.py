"""Structured logging as ``[logging]`` asks: JSON lines (or text) to a file or a stream."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from ._config import LoggingConfig

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message and every ``extra`` field."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``HH:MM:SS LEVEL logger: message``, then the ``extra`` fields as ``[key=value ...]``
    unless ``fields`` is false (``logging.structured = false``: plain text)."""

    def __init__(self, fields: bool = True) -> None:
        super().__init__()
        self.fields = fields

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in record.__dict__.items()
                          if self.fields and k not in _STANDARD and not k.startswith("_"))
        line = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} " \
               f"{record.levelname:<7} {record.name}: {record.getMessage()}"
        if extras:
            line += f" [{extras}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(cfg: LoggingConfig, stream: TextIO | None = None) -> None:
    """Install the root handler ``cfg`` describes (replacing earlier ones)."""
    if cfg.output.type == "file":
        Path(cfg.output.path).parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(cfg.output.path, encoding="utf-8")
    else:
        handler = logging.StreamHandler(stream or (sys.stdout if cfg.output.type == "stdout"
                                                   else sys.stderr))
    if not cfg.structured:
        handler.setFormatter(TextFormatter(fields=False))
    else:
        handler.setFormatter(JsonFormatter() if cfg.format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(cfg.level.upper())
