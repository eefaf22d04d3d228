"""Log setup: readable text for people, one JSON object per line for pipelines."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Hashable

import orjson

EVERY_SECONDS = 60.0


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the fields log pipelines index."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # kombu and redis-py log connection details at INFO; ours say it better.
    for noisy in ("kombu", "amqp", "redis"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class Throttle:
    """Whether a repeated warning is due: at most once every ``seconds`` per key, so a
    flood of the same trouble costs one log line a minute, and its count says the rest."""

    def __init__(self, seconds: float = EVERY_SECONDS) -> None:
        self.seconds = seconds
        self._last: dict[Hashable, float] = {}

    def due(self, key: Hashable = None) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, -self.seconds) < self.seconds:
            return False
        self._last[key] = now
        return True

    def forget(self, key: Hashable) -> None:
        self._last.pop(key, None)
