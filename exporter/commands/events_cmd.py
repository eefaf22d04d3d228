"""``events``: the event stream as it arrives, one line per event, filtered.

Each line is flushed, so the command pipes into ``grep`` or ``jq`` live. Text
lines are meant for reading: time (the event's own timestamp, local time),
type, hostname, task name and id, then the fields that matter for that type.
``--json`` gives the event as received plus its ``arrival`` time. A message the
daemon would drop is shown as one ``dropped`` line with the reason.

Only ``task-sent`` and ``task-received`` carry a task's name: later events of a
task are matched by ``--task`` (and named in text lines) through the name
remembered from those, so a task already received before the command started
stays unnamed and does not match.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections import OrderedDict
from fnmatch import fnmatchcase
from typing import Any, TextIO

import orjson

from ..config import Config
from .listen import listen, positive, printable

MAX_NAMES = 100_000
"""Task names remembered by task id, least recently named first out."""
MAX_TEXT = 200
"""Characters of one field shown in a text line."""

# Fields worth a glance, per event type; falsy ones are left out except these.
FIELDS: dict[str, tuple[str, ...]] = {
    "task-sent": ("queue", "eta", "retries"),
    "task-received": ("eta", "retries"),
    "task-succeeded": ("runtime",),
    "task-failed": ("exception",),
    "task-retried": ("exception",),
    "task-rejected": ("requeue",),
    "task-revoked": ("terminated", "expired", "signum"),
    "worker-online": ("sw_ident", "sw_ver", "freq"),
    "worker-heartbeat": ("active", "processed", "freq"),
    "worker-offline": (),
}
SHOWN_WHEN_ZERO = frozenset({"active", "processed"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--type",
        dest="types",
        action="append",
        default=[],
        metavar="GLOB",
        help="only events of this type, e.g. task-failed or 'task-*' (repeatable)",
    )
    parser.add_argument(
        "--task",
        default=None,
        metavar="GLOB",
        help="only events of tasks of this name (a task's later events match through the "
        "name its task-sent or task-received gave)",
    )
    parser.add_argument(
        "--worker",
        default=None,
        metavar="GLOB",
        help="only events of this hostname, e.g. 'celery@web-*'",
    )
    parser.add_argument(
        "--count",
        type=positive(int),
        default=None,
        metavar="N",
        help="stop after printing N events",
    )
    parser.add_argument(
        "--seconds",
        type=positive(float),
        default=None,
        metavar="SECONDS",
        help="stop after SECONDS",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=False,
        help="one JSON object per line: the event and its arrival",
    )


class Printer:
    """The pipeline's tracker for ``events``: prints what passes the filters, ``count`` at most."""

    def __init__(
        self,
        out: TextIO,
        done: threading.Event,
        *,
        json: bool = False,
        types: list[str] | tuple[str, ...] = (),
        task: str | None = None,
        worker: str | None = None,
        count: int | None = None,
    ) -> None:
        self.out = out
        self.done = done
        self.json = json
        self.types = tuple(types)
        self.task = task
        self.worker = worker
        self.left = count
        self.names: OrderedDict[str, str] = OrderedDict()

    def handle(self, event: dict[str, Any], arrival: float) -> None:
        name = self._name(event)
        if self.done.is_set() or not self._wanted(event, name):
            return
        self._write(_json({**event, "arrival": arrival}) if self.json else _line(event, name))
        if self.left is not None:
            self.left -= 1
            if self.left <= 0:
                self.done.set()

    def tick(self, now: float) -> None:
        """Nothing to keep up: the command only prints."""

    def dropped(self, reason: str, detail: str) -> None:
        if self.done.is_set():
            return
        now = time.time()
        if self.json:
            self._write(orjson.dumps({"dropped": reason, "detail": detail, "arrival": now}))
        else:
            self._write(f"{_time(now)} dropped {reason}: {_clean(detail)}")

    def _name(self, event: dict[str, Any]) -> str | None:
        """The task's name, from this event or remembered from an earlier one of the task."""
        uuid = event.get("uuid")
        if type(uuid) is not str:
            return None
        name = event.get("name")
        names = self.names
        if type(name) is str and event["type"] in ("task-sent", "task-received"):
            names[uuid] = name
            names.move_to_end(uuid)
            if len(names) > MAX_NAMES:
                names.popitem(last=False)
            return name
        return names.get(uuid)

    def _wanted(self, event: dict[str, Any], name: str | None) -> bool:
        kind = event["type"]
        if self.types and not any(fnmatchcase(kind, glob) for glob in self.types):
            return False
        if self.worker is not None and not fnmatchcase(event["hostname"], self.worker):
            return False
        return self.task is None or (name is not None and fnmatchcase(name, self.task))

    def _write(self, line: str | bytes) -> None:
        text = line.decode() if isinstance(line, bytes) else line
        try:
            self.out.write(text + "\n")
            self.out.flush()
        except BrokenPipeError:  # the reader went away (``| head``): end quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.out.fileno())
            self.done.set()


def _json(value: Any) -> bytes:
    try:
        return orjson.dumps(value, default=repr, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:  # bytes keys (msgpack) or integers past 64 bits: shown as their repr
        return orjson.dumps(_plain(value))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key if isinstance(key, str) else repr(key): _plain(item) for key, item in value.items()
        }
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, str | float | bool | None) or (
        isinstance(value, int) and -(2**63) <= value < 2**64
    ):
        return value
    return repr(value)


def _line(event: dict[str, Any], name: str | None) -> str:
    kind = event["type"]
    parts = [_time(event["timestamp"]), f"{_clean(kind):<16}", _clean(event["hostname"])]
    uuid = event.get("uuid")
    if uuid is not None:
        parts.append(f"{_clean(name or '?')}[{_clean(uuid)}]")
    for key in FIELDS.get(kind, ()):
        value = event.get(key)
        if value is None or (not value and key not in SHOWN_WHEN_ZERO):
            continue
        shown = f"{value:.4g}s" if key == "runtime" and type(value) is not str else _clean(value)
        parts.append(f"{key}={shown}")
    return " ".join(parts)


def _time(timestamp: float) -> str:
    try:
        whole = time.strftime("%H:%M:%S", time.localtime(timestamp))
    except (OverflowError, OSError, ValueError):  # a timestamp from far outside this era
        return repr(timestamp)
    return f"{whole}.{int(timestamp % 1 * 1000):03d}"


def _clean(value: Any) -> str:
    """An event's field for a text line: printable, length bounded."""
    return printable((value if isinstance(value, str) else repr(value))[:MAX_TEXT])


def run(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    done = threading.Event()
    printer = Printer(
        out,
        done,
        json=args.json,
        types=args.types,
        task=args.task,
        worker=args.worker,
        count=args.count,
    )
    listen(config, printer, done, args.seconds)
    return 0
