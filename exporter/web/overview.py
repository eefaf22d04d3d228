"""The overview behind the landing page and ``/api/v1/overview``.

Everything here costs nothing per event: the throughput history is sampled
from the counters' totals at the receive loop's tick, the failure ring is
filled only by task-failed events, and the rest is read from the metric
families when a page asks. Figures whose metric this build does not export
read ``None`` ("not available"), so the page shows what the exporter has.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from .. import __version__
from ..health import Health
from ..telemetry.metrics import Family, Histogram, Metrics
from ..track.task import UNKNOWN, Event, Task, exception_class
from .server import Status, diagnosis

SAMPLE_SECONDS = 10.0
WINDOW_SECONDS = 900.0
SAMPLES = int(WINDOW_SECONDS / SAMPLE_SECONDS) + 1
"""91 totals make the 90 ten-second intervals of the last 15 minutes."""
STATES = ("succeeded", "failed", "retried", "rejected", "revoked")
BUSIEST_TASKS = 10
TRACEBACK_BYTES = 8192
MESSAGE_CHARS = 1000
TEXT_CHARS = 200
EVENTS_PER_SECOND_OVER = 60.0


def _total(family: Family | None) -> float | None:
    """The sum of a counter or gauge family's series; None when the family is not exported."""
    if family is None or isinstance(family, Histogram):
        return None
    return sum(list(family.values.values()))


Timings = tuple[float, float, tuple[tuple[float, ...], ...]]
"""When, the backlog of the queues probed, the histograms' bucket totals."""


def _bucket_totals(family: Histogram) -> tuple[float, ...]:
    """A histogram's bucket counts summed over its series (its sums left out)."""
    width = len(family.bounds) + 1
    totals = [0.0] * width
    for series in list(family.values.values()):
        for slot, count in enumerate(series[:width]):
            totals[slot] += count
    return tuple(totals)


def _growth(before: Sequence[float], after: Sequence[float]) -> list[float]:
    """Bucket counts added between two totals; a purged worker's series reads 0, not less."""
    return [max(0.0, late - early) for early, late in zip(before, after, strict=True)]


def _intervals(samples: Sequence[Any]) -> tuple[list[tuple[Any, Any]], dict[str, Any]]:
    """Consecutive samples, and a view's header: the interval, the window and each
    interval's end (a sample's first item is its time)."""
    pairs = list(itertools.pairwise(samples))
    view = {
        "interval_seconds": SAMPLE_SECONDS,
        "window_seconds": WINDOW_SECONDS,
        "time": [after[0] for _, after in pairs],
    }
    return pairs, view


class History:
    """Totals of task states and events, one sample every 10 s for the last 15 minutes.

    ``sample`` runs on the event thread at each tick of the receive loop; the
    ring holds ``SAMPLES`` tuples of seven numbers, whatever the traffic, and
    ``timings`` as many of the run time and queue wait histograms' bucket
    totals (over all series) and the queues' backlog.
    """

    def __init__(self, metrics: Metrics, health: Health) -> None:
        self.health = health
        self._families = [metrics.families[f"celery_task_{state}_total"] for state in STATES]
        self.samples: deque[tuple[float, ...]] = deque(maxlen=SAMPLES)
        self._histograms = {
            "runtime": metrics.histogram("celery_task_runtime_seconds"),
            "queue_wait": metrics.histogram("celery_task_queue_wait_seconds"),
        }
        self._backlog = metrics.families["celery_queue_length"]
        self.timings: deque[Timings] = deque(maxlen=SAMPLES)
        self._next = 0.0

    def sample(self, now: float) -> None:
        """Record the totals when a sample is due (the first at once)."""
        if now < self._next:
            return
        self._next += SAMPLE_SECONDS  # keeps the cadence, though ticks come a little late
        if self._next <= now:
            self._next = now + SAMPLE_SECONDS
        totals = (_total(family) or 0.0 for family in self._families)
        self.samples.append((now, self.health.events_received, *totals))
        buckets = tuple(_bucket_totals(family) for family in self._histograms.values())
        self.timings.append((now, _total(self._backlog) or 0.0, buckets))

    def timings_view(self) -> dict[str, Any]:
        """Run time and queue wait over the window: p50 and p95, and the p95 of each
        interval; and the backlog of all queues at each interval's end."""
        samples = tuple(self.timings)
        pairs, view = _intervals(samples)
        view["backlog"] = [after[1] for _, after in pairs]
        for index, (kind, family) in enumerate(self._histograms.items()):
            view[f"{kind}_p95"] = [
                quantile(0.95, family.bounds, _growth(before[2][index], after[2][index]))
                for before, after in pairs
            ]
            window = _growth(samples[0][2][index], samples[-1][2][index]) if pairs else []
            view[kind] = {
                "count": sum(window),
                "p50": quantile(0.5, family.bounds, window),
                "p95": quantile(0.95, family.bounds, window),
            }
        return view

    def view(self) -> dict[str, Any]:
        """Tasks per interval by state; a series shrunk by a purged worker reads 0, not less."""
        pairs, view = _intervals(tuple(self.samples))
        for index, state in enumerate(STATES, start=2):
            view[state] = [max(0.0, after[index] - before[index]) for before, after in pairs]
        failed, succeeded = sum(view["failed"]), sum(view["succeeded"])
        view["failure_ratio"] = failed / (failed + succeeded) if failed + succeeded else None
        return view

    def events_per_second(self) -> float | None:
        """Events received per second over the last minute of samples."""
        samples = tuple(self.samples)
        if len(samples) < 2:
            return None
        last = samples[-1]
        first = next(s for s in samples if last[0] - s[0] <= EVENTS_PER_SECOND_OVER + 1)
        if first is last:
            first = samples[-2]
        return (last[1] - first[1]) / (last[0] - first[0])


class FailureRing:
    """The last failures, newest last: a fixed ring written only by task-failed events.

    Arguments, keyword arguments and results are never kept; tracebacks are
    cut to 8 KiB and messages to 1,000 characters, so the ring's memory is
    bounded by its capacity.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.failures: deque[dict[str, Any]] = deque(maxlen=capacity)

    def record(self, task: Task, event: Event) -> None:
        """A ``TaskHandler`` chained after the tracker's task-failed handler."""
        traceback = event.get("traceback")
        traceback = traceback if isinstance(traceback, str) else ""
        exception, message = describe(event.get("exception"), traceback)
        self.failures.append(
            {
                "time": time.time(),  # the exporter's clock, as every other age here
                "name": task.name,
                "uuid": event["uuid"],
                "hostname": _text(event["hostname"], TEXT_CHARS),
                "exception": exception,
                "message": message,
                "traceback": _tail(traceback),
            }
        )

    def groups(self, since: float) -> list[dict[str, Any]]:
        """The failures held since ``since``, one row per task name and exception class,
        most frequent first, each with its count and its latest failure."""
        groups: dict[tuple[str, str], dict[str, Any]] = {}
        for failure in list(self.failures):  # oldest first: the latest is the last seen
            if failure["time"] < since:
                continue
            key = (failure["name"], failure["exception"])
            group = groups.get(key)
            if group is None:
                groups[key] = {
                    "name": key[0],
                    "exception": key[1],
                    "count": 1,
                    "first": failure["time"],
                    "latest": failure,
                }
            else:
                group["count"] += 1
                group["latest"] = failure
        return sorted(groups.values(), key=lambda row: (-row["count"], -row["latest"]["time"]))

    def traceback(self, uuid: str) -> str | None:
        """The traceback of the task's latest failure, while the ring holds it."""
        for failure in reversed(list(self.failures)):
            if failure["uuid"] == uuid:
                return failure["traceback"]
        return None


def describe(value: object, traceback: str | None = None) -> tuple[str, str]:
    """The exception class and message from Celery's ``repr()`` of an exception:
    ``("ValueError", "'boom'")`` from ``"ValueError('boom')"``."""
    text = _text(value, MESSAGE_CHARS)
    exception = exception_class(text, traceback)
    if exception != UNKNOWN and text.startswith(exception + "(") and text.endswith(")"):
        return exception, text[len(exception) + 1 : -1]
    return exception, text


def _text(value: object, limit: int) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _tail(text: str, limit: int = TRACEBACK_BYTES) -> str:
    """The end of a traceback within ``limit`` UTF-8 bytes: its last lines name the error."""
    encoded = text[-limit:].encode()
    if len(text) <= limit and len(encoded) <= limit:
        return text
    return "…\n" + encoded[-limit:].decode(errors="ignore")


def quantile(q: float, bounds: Sequence[float], counts: Sequence[float]) -> float | None:
    """The ``q`` quantile estimated from bucket counts, as Prometheus' histogram_quantile does:
    linear within the bucket; the highest finite bound when it falls in +Inf."""
    total = sum(counts[: len(bounds) + 1])
    if not total:
        return None
    rank, cumulative = q * total, 0.0
    for index, bound in enumerate(bounds):
        count = counts[index]
        if cumulative + count >= rank and count:
            lower = bounds[index - 1] if index else 0.0
            return lower + (bound - lower) * (rank - cumulative) / count
        cumulative += count
    return bounds[-1]


def _by_first(family: Family | None) -> dict[str, float]:
    """A counter or gauge family summed by its first label (task name, queue or hostname);
    empty when the family is not exported."""
    sums: dict[str, float] = {}
    if family is None or isinstance(family, Histogram):
        return sums
    for (first, *_), value in list(family.values.items()):
        sums[first] = sums.get(first, 0.0) + value
    return sums


def _histograms_by_first(family: Histogram) -> dict[str, list[float]]:
    """Bucket counts per task name, summed over queues."""
    merged: dict[str, list[float]] = {}
    for (name, *_), series in list(family.values.items()):
        counts = merged.get(name)
        if counts is None:
            merged[name] = list(series)
        else:
            for slot, count in enumerate(list(series)):
                counts[slot] += count
    return merged


class Overview:
    """Assembles the overview from the metrics, the status, the history and the failures."""

    def __init__(self, metrics: Metrics, history: History, failures: FailureRing | None) -> None:
        self.metrics = metrics
        self.history = history
        self.failures = failures

    def view(self, status: Status, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        return {
            "time": now,
            "exporter": self._exporter(status, now),
            "throughput": self.history.view(),
            "tasks": self._tasks(now),
            "queues": self._queues(),
            "workers": self._workers(status, now),
            "recent_failures": self._failures(),
            "timings": self.history.timings_view(),
            "failure_groups": self._failure_groups(now),
        }

    def _exporter(self, status: Status, now: float) -> dict[str, Any]:
        families = self.metrics.families
        return {
            "version": __version__,
            "broker": status.broker,
            "connected": status.connected,
            "last_error": status.last_error,
            "diagnosis": diagnosis(status, now),
            "started_at": status.started_at,
            "events_received": status.events_received,
            "last_event_at": status.last_event_at,
            "events_per_second": self.history.events_per_second(),
            "events_invalid": _total(families.get("celery_exporter_events_invalid_total")),
            "events_missed": _total(families.get("celery_exporter_events_missed_total")),
            "memory_bytes": resident_memory(),
        }

    def _tasks(self, now: float) -> list[dict[str, Any]]:
        """The busiest task names (most started since the exporter started), with percentiles
        of their run time and queue wait since the exporter started."""
        get = self.metrics.families.get
        started = _by_first(get("celery_task_started_total"))
        finished = {state: _by_first(get(f"celery_task_{state}_total")) for state in STATES}
        names = set(started).union(*finished.values())
        succeeded = finished["succeeded"]
        busiest = sorted(
            names, key=lambda name: (-started.get(name, 0.0), -succeeded.get(name, 0.0), name)
        )[:BUSIEST_TASKS]
        running_family = get("celery_task_running")
        running = _by_first(running_family)
        oldest: dict[str, float] = {}
        oldest_family = get("celery_task_oldest_running_start_timestamp_seconds")
        if oldest_family is not None and not isinstance(oldest_family, Histogram):
            for (name, *_), start in list(oldest_family.values.items()):
                oldest[name] = min(start, oldest.get(name, start))
        timings = {
            kind: (family.bounds, _histograms_by_first(family))
            for kind, family in (
                ("runtime", self.metrics.histogram("celery_task_runtime_seconds")),
                ("queue_wait", self.metrics.histogram("celery_task_queue_wait_seconds")),
            )
        }
        rows = []
        for name in busiest:
            row: dict[str, Any] = {"name": name, "started": started.get(name, 0.0)}
            for state in STATES:
                row[state] = finished[state].get(name, 0.0)
            row["running"] = running.get(name, 0.0) if running_family is not None else None
            row["oldest_running_age_seconds"] = now - oldest[name] if name in oldest else None
            for kind, (bounds, by_name) in timings.items():
                counts = by_name.get(name, ())
                row[f"{kind}_p50"] = quantile(0.5, bounds, counts) if counts else None
                row[f"{kind}_p95"] = quantile(0.95, bounds, counts) if counts else None
            rows.append(row)
        return rows

    def _queues(self) -> list[dict[str, Any]]:
        get = self.metrics.families.get
        columns = {
            column: _by_first(get(f"celery_queue_{column}"))
            for column in ("length", "consumers", "workers")
        }
        return [
            {"name": queue} | {column: values.get(queue) for column, values in columns.items()}
            for queue in sorted(set().union(*columns.values()))
        ]

    def _workers(self, status: Status, now: float) -> list[dict[str, Any]]:
        get = self.metrics.families.get
        columns = {
            column: _by_first(get(name))
            for column, name in (
                ("active", "celery_worker_tasks_active"),
                ("pool_size", "celery_worker_pool_size"),
                ("prefetched", "celery_worker_tasks_prefetched"),
                ("prefetch_limit", "celery_worker_prefetch_limit"),
                ("processed", "celery_worker_tasks_processed_total"),
            )
        }
        return [
            {
                "hostname": worker.hostname,
                "up": worker.up,
                **{column: values.get(worker.hostname) for column, values in columns.items()},
                "heartbeat_age_seconds": now - worker.last_heartbeat,
                "version": worker.version,
            }
            for worker in status.workers
        ]

    def _failures(self) -> dict[str, Any]:
        ring = self.failures
        if ring is None:
            return {"enabled": False, "capacity": 0, "items": []}
        return {"enabled": True, "capacity": ring.capacity, "items": list(ring.failures)[::-1]}

    def _failure_groups(self, now: float) -> dict[str, Any]:
        ring = self.failures
        return {
            "enabled": ring is not None,
            "capacity": ring.capacity if ring else 0,
            "window_seconds": WINDOW_SECONDS,
            "items": ring.groups(now - WINDOW_SECONDS) if ring else [],
        }


def resident_memory() -> int | None:
    """The process' resident memory in bytes, from ``/proc/self/statm`` (Linux)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
