"""Task lookups behind ``/api/v1/tasks``: one task by id, or the latest matching a filter.

Read from the tracker's own records (``Tracker.records``), copied under the
interpreter lock, on the HTTP thread that asks; the event thread never waits
for a lookup. Everything in a query is untrusted: it is bounded before it is
used, globs are matched by a regular expression ``fnmatch`` translates
(linear in the name for any number of stars), and a bad query is a 400 that
says which parameter is wrong.
"""

from __future__ import annotations

import heapq
import itertools
import re
from collections.abc import Iterable, Iterator
from fnmatch import translate
from typing import Any
from urllib.parse import parse_qsl, unquote

from ..track.task import UNKNOWN, Task, exception_class
from ..track.tracker import RECENTLY_FINISHED, Tracker
from .overview import TEXT_CHARS, FailureRing, describe
from .server import TASKS_PATH

ID_CHARS = 255
"""Celery's ids are 36-character UUIDs; clients may choose their own, rarely longer."""
GLOB_CHARS = 200
QUERY_CHARS = 2048
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
"""A larger ``limit`` is answered with this many: the answer stays small whatever is asked."""
STATES = ("sent", "received", "started", "retried", "succeeded", "failed", "rejected", "revoked")
PARAMETERS = ("id", "name", "state", "worker", "limit")
COPY_ATTEMPTS = 3

Answer = tuple[int, dict[str, Any]]


class BadQuery(ValueError):
    """A query refused with a 400; the message names the parameter."""


class TaskLookup:
    """Answers ``/api/v1/tasks`` from the tracker's records (in flight, then finished)."""

    def __init__(self, tracker: Tracker, failures: FailureRing | None, capacity: int) -> None:
        self.tracker = tracker
        self.failures = failures
        self.capacity = capacity

    def answer(self, path: str, query: str) -> Answer:
        """The status and JSON body for a request to ``path`` (under ``TASKS_PATH``)."""
        try:
            if path == TASKS_PATH:
                return 200, self.search(query)
            uuid = _bounded("id", unquote(path[len(TASKS_PATH) + 1 :]), ID_CHARS)
        except BadQuery as error:
            return 400, {"error": str(error)}
        record = self.find(uuid)
        return (200, record) if record is not None else (404, {"error": "no such task"})

    def find(self, uuid: str) -> dict[str, Any] | None:
        """One task's record, with its traceback if it failed and the failure list holds it."""
        task = self.tracker.record(uuid)
        if task is None or (task.done and not self._served(uuid)):
            return None
        record = describe_task(uuid, task)
        if record["state"] == "failed" and self.failures is not None:
            traceback = record["traceback"] = self.failures.traceback(uuid)
            if record["exception"] == UNKNOWN and traceback:  # a Reject names it there only
                record["exception"] = exception_class(record["message"], traceback)
        return record

    def search(self, query: str) -> dict[str, Any]:
        """The latest tasks matching the query, newest first; the fields of a record are
        matched first, then those derived from its events, so few records are described."""
        filters = parse_query(query)
        tasks: Iterator[tuple[str, Task]] = self._newest_first()
        prefix, name = filters.get("id"), filters.get("name")
        if prefix is not None:
            tasks = (item for item in tasks if item[0].startswith(prefix))
        if name is not None:
            tasks = (item for item in tasks if name.match(item[1].name))
        records = (describe_task(uuid, task) for uuid, task in tasks)
        state, worker = filters.get("state"), filters.get("worker")
        if state is not None:
            records = (record for record in records if record["state"] == state)
        if worker is not None:
            records = (record for record in records if worker.match(record["worker"] or ""))
        limit = filters["limit"]
        return {
            "capacity": self.capacity,
            "limit": limit,
            "items": list(itertools.islice(records, limit)),
        }

    def _copies(self) -> tuple[list[tuple[str, Task]], list[tuple[str, Task]]]:
        for _ in range(COPY_ATTEMPTS - 1):
            try:
                return self.tracker.records()
            except RuntimeError:  # the event thread changed a table during the copy
                continue
        return self.tracker.records()

    def _newest_first(self) -> Iterator[tuple[str, Task]]:
        """In flight (most recently active first) and finished (latest first), merged by
        each task's latest event; only the newest ``capacity`` finished are served."""
        in_flight, finished = self._copies()
        finished = finished[-self.capacity :]
        return heapq.merge(reversed(in_flight), reversed(finished), key=_latest, reverse=True)

    def _served(self, uuid: str) -> bool:
        """Whether a finished task is among the newest ``capacity``: the tracker keeps at
        least ``RECENTLY_FINISHED`` for late events, and may hold more than are served."""
        if self.capacity >= RECENTLY_FINISHED:
            return True
        return any(held == uuid for held, _ in self._copies()[1][-self.capacity :])


def parse_query(query: str) -> dict[str, Any]:
    """The filters of a query string, each checked; ``BadQuery`` names what is wrong."""
    if len(query) > QUERY_CHARS:
        raise BadQuery(f"the query is longer than {QUERY_CHARS} characters")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=len(PARAMETERS))
    except ValueError:
        raise BadQuery(f"at most {len(PARAMETERS)} parameters: {', '.join(PARAMETERS)}") from None
    filters: dict[str, Any] = {"limit": DEFAULT_LIMIT}
    seen: set[str] = set()
    for key, value in pairs:
        if key not in PARAMETERS:
            raise BadQuery(f"unknown parameter {key[:40]!r}; known: {', '.join(PARAMETERS)}")
        if key in seen:
            raise BadQuery(f"{key}: given twice")
        seen.add(key)
        if key == "limit":
            filters["limit"] = _limit(value)
        elif key == "state":
            if value not in STATES:
                raise BadQuery(f"state: one of {', '.join(STATES)}, not {value[:40]!r}")
            filters["state"] = value
        elif key == "id":
            filters["id"] = _bounded("id", value, ID_CHARS)
        elif value:
            filters[key] = re.compile(translate(_bounded(key, value, GLOB_CHARS)))
    return filters


def _bounded(key: str, value: str, limit: int) -> str:
    if not value:
        raise BadQuery(f"{key}: empty")
    if len(value) > limit:
        raise BadQuery(f"{key}: longer than {limit} characters")
    return value


def _limit(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or len(value) > 12 or int(value) < 1:
        raise BadQuery(f"limit: a whole number of at least 1, not {value[:40]!r}")
    return min(int(value), MAX_LIMIT)


def _latest(item: tuple[str, Task]) -> float:
    return max(_stamps(item[1]), default=0.0)


def _stamps(task: Task) -> Iterable[float]:
    final = getattr(task, "final", None)
    retried = getattr(task, "retried", None)
    for stamp in (task.sent, task.received, task.started):
        if stamp is not None:
            yield stamp
    if retried is not None:
        yield retried[1]["timestamp"]
    if final is not None:
        yield final["timestamp"]


def describe_task(uuid: str, task: Task) -> dict[str, Any]:
    """A task's record as the API shows it: times are the workers' (and, for ``sent``,
    the client's) clocks in Unix seconds; durations in seconds; ``None`` where unknown."""
    final = getattr(task, "final", None)
    retries, retry = getattr(task, "retried", None) or (0, None)
    started = task.started
    if final is not None:
        state = final["type"].removeprefix("task-")
        worker = final["hostname"]
        ended = final["timestamp"]
    else:
        times = [(task.sent, "sent"), (task.received, "received"), (started, "started")]
        if retry is not None:
            times.append((retry["timestamp"], "retried"))
        known = [(stamp, name) for stamp, name in times if stamp is not None]
        state = max(known)[1] if known else "received"
        worker = task.worker or task.prefetched_on
        ended = None
    runtime = None
    if state == "succeeded":
        runtime = final.get("runtime")  # type: ignore[union-attr]
    elif state == "failed" and started is not None and ended is not None:
        runtime = max(0.0, ended - started)
    reason = final if state == "failed" else retry
    exception, message = describe(reason.get("exception")) if reason is not None else (None, None)
    return {
        "uuid": uuid,
        "name": task.name,
        "queue": task.queue,
        "state": state,
        "worker": worker[:TEXT_CHARS] if worker else None,
        "sent": task.sent,
        "eta": task.eta,
        "received": task.received,
        "started": started,
        "retried": retry["timestamp"] if retry is not None else None,
        "ended": ended,
        "retries": retries,
        "runtime": runtime,
        "exception": exception,
        "message": message,
    }
