"""Log formats: readable lines for a terminal, one JSON object per line for containers."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


class Outage:
    """One log line when a repeated call starts failing and one when it works again, instead of
    one per retry (a Redis stall would otherwise log hundreds of lines a minute)."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._logger = logger
        self._what = what
        self._since: float | None = None

    def failed(self, error: Exception) -> None:
        if self._since is None:
            self._since = time.monotonic()
            self._logger.warning("%s failed, retrying until Redis takes it: %s", self._what, error)

    def recovered(self) -> None:
        if self._since is not None:
            self._logger.warning("%s works again after %.1f s", self._what, time.monotonic() - self._since)
            self._since = None
