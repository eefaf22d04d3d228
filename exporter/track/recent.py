"""What a task's record keeps for lookups (``--recent-tasks``): its final and last retried event.

The tracker already keeps a ``Task`` for each task in flight and for the
last finished ones; these hooks, chained once after the task handlers when
lookups are on, add the one reference a lookup needs that the record lacks.
An event is kept whole, as decoded, minus what must never be kept or would
make the records' memory unbounded: the result and the traceback (a
failure's traceback is served from the failure list, which keeps its tail).
Events carry arguments and keyword arguments only on task-sent and
task-received, which are never kept.

The two slots stay unset until a hook fills them, so a tracker without
lookups never stores them; readers use ``getattr(task, ..., None)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .task import Event, Task


def _ended(task: Task, event: Event) -> None:
    task.final = event


def _succeeded(task: Task, event: Event) -> None:
    event.pop("result", None)
    task.final = event


def _failed(task: Task, event: Event) -> None:
    event.pop("traceback", None)
    task.final = event


def _retried(task: Task, event: Event) -> None:
    """Keeps the latest retry and counts them: ``(retries, event)``."""
    event.pop("traceback", None)
    previous = getattr(task, "retried", None)
    task.retried = (previous[0] + 1 if previous else 1, event)


RECORD_HOOKS: Mapping[str, Callable[[Task, Event], Any]] = {
    "task-succeeded": _succeeded,
    "task-failed": _failed,
    "task-rejected": _ended,
    "task-revoked": _ended,
    "task-retried": _retried,
}
"""Chained last, after the span hooks and the failure list, which read what these drop."""
