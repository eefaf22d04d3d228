"""A task's record in the tracker's table, and the shapes of what the tracker hands on.

The record holds what later events need but do not carry; the span hooks,
Flower's families and the lookups read it and keep state of their own in it.
The helpers here read two fields every consumer of events needs the same
way: the exception class a failure names, and an ETA.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from ..telemetry.metrics import LabelValues
from .labels import LabelLimiter

UNKNOWN = "unknown"
Event = dict[str, Any]
FINAL = frozenset({"task-succeeded", "task-failed", "task-rejected", "task-revoked"})


class Task:
    """One in-flight task: the fields later events refer back to.

    ``trace`` belongs to the span hooks (``exporter.telemetry.span_hooks``): None
    until they see the task. ``final`` and ``retried`` belong to the lookups'
    hooks (``exporter.track.recent``), and stay unset without them.
    """

    __slots__ = ("done", "eta", "final", "name", "prefetched_on", "queue", "received", "retried",
                 "running", "scheduled_on", "sent", "started", "trace", "worker")  # fmt: skip

    def __init__(self, name: str, queue: str) -> None:
        self.name = name
        self.queue = queue
        self.sent: float | None = None
        self.eta: float | None = None
        self.received: float | None = None
        self.prefetched_on: str | None = None
        self.scheduled_on: str | None = None  # held by this worker until its ETA
        self.started: float | None = None  # task-started of the latest execution
        self.worker: str | None = None  # the worker it started on
        self.running: LabelValues | None = None  # (name, queue) while it runs
        self.done = False
        self.trace: Any = None


TaskHandler = Callable[[Task, Event], None]
"""Applies a task event to the task's record (from the table, or made for it)."""
WorkerHandler = Callable[[Event, float], None]
Hook = TaskHandler


class SpanHooks(Protocol):
    """What the tracker calls when traces are on (``exporter.telemetry.span_hooks.Spans``)."""

    def hooks(self) -> Mapping[str, Hook]:
        """A hook per task event type, given the task's record and the event."""

    def evicted(self, task: Task) -> None:
        """The task left the full table unfinished."""

    def interrupted(self, task: Task, hostname: str) -> None:
        """The worker running the task was lost: end its execution span with an error."""

    def close(self) -> None:
        """Export what is pending: the daemon is stopping."""


class FlowerHooks(Protocol):
    """What the tracker calls when Flower's families are on (``exporter.telemetry.flower``)."""

    def hooks(self, label: LabelLimiter) -> tuple[Mapping[str, Hook], Mapping[str, WorkerHandler]]:
        """A hook per task event type and per worker event type, bounded by ``label``."""

    def forget(self, hostname: str) -> None:
        """The worker was purged: drop its series."""


def exception_class(text: str | None, traceback: str | None = None) -> str:
    """``ValueError`` from Celery's ``repr()`` of it, ``"ValueError('boom')"``.

    Some exceptions' text is not their ``repr()``: a ``Reject`` reads
    ``reject requeue=False: …``. Then the traceback's last line names the
    class (``celery.exceptions.Reject: …``).
    """
    if text:
        name = text.partition("(")[0].strip()
        if _CLASS_NAME.fullmatch(name):
            return name
    if traceback:
        last = traceback.rstrip().rpartition("\n")[2]
        name = last.partition(":")[0].strip().rpartition(".")[2]
        if _CLASS_NAME.fullmatch(name) and not last.startswith((" ", "\t")):
            return name
    return UNKNOWN


_CLASS_NAME = re.compile(r"[A-Za-z_][\w.]*")


def eta_timestamp(value: str | None) -> float | None:
    """Celery sends ETAs as ISO 8601 text; naive ones are UTC."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()
