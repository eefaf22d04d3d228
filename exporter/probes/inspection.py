"""Worker capacity and work from Celery's ``inspect`` commands: pool sizes, prefetch
limits, queues, and the tasks each worker runs and holds.

Heartbeats tell how many tasks a worker runs, not how many it could, and on
Redis the broker cannot tell who consumes a queue. So every
``--inspect-interval`` seconds, on its own thread, ``stats`` and
``active_queues`` are broadcast (what ``celery inspect stats`` and
``celery inspect active_queues`` send) and replies are collected for up to
``--inspect-timeout`` seconds; a round ends early once every worker whose
heartbeats arrive has answered every command. A scrape only reads the gauges.
The same round asks for ``active``, ``reserved`` and ``scheduled``, and hands
what the workers run and hold to the tracker, which sets its task table right
by them (``exporter.track.reconcile``) on its own thread.

Replies are untrusted like events: only JSON and msgpack are read, refused
ones are counted, hostnames and queue names go through the tracker's label
limits, and what is kept per worker is a few numbers and a set of queues.
A worker that does not answer keeps its last values until its heartbeats
stop (its queues stop counting) and it is purged (its series go).

The tracker's worker table and label limiter are read from this thread while
the event thread writes them: each read is one dict or set operation, atomic
in CPython, and a race costs at most one value admitted past the label limit
or one stale series, removed by the next round.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kombu.message import Message

from ..config import Config
from ..decode import (
    CONTENT_TYPE,
    MALFORMED,
    MAX_BODY_BYTES,
    MISSING_FIELD,
    TOO_LARGE,
    WRONG_TYPE,
    InvalidMessage,
    decode_body,
)
from ..telemetry.metrics import Gauge, Metrics
from ..track import reconcile
from ..track.labels import OTHER
from ..track.reconcile import InFlight, Reconciliation, WorkerView
from ..track.tracker import Tracker
from .control import ControlClient
from .periodic import Periodic

log = logging.getLogger(__name__)

STATS, ACTIVE_QUEUES = "stats", "active_queues"
COMMANDS = (STATS, ACTIVE_QUEUES, *reconcile.COMMANDS)
MAX_TASKS_REPLY_BYTES = 16 << 20
"""A reply to active, reserved or scheduled lists a worker's tasks with their arguments:
larger than an event, or another command's reply, may be."""
BROKER, TIMEOUT = "broker", "timeout"
"""Reasons for celery_exporter_inspect_errors_total: the broadcast or the collection
failed, or a worker whose heartbeats arrive did not answer in time."""
REPLY_REASONS = (TOO_LARGE, CONTENT_TYPE, MALFORMED, WRONG_TYPE, MISSING_FIELD)
"""Reasons for celery_exporter_inspect_replies_invalid_total."""


@dataclass(slots=True)
class Capacity:
    """What one worker last said about itself."""

    pool: int | None = None
    prefetch: int | None = None
    queues: frozenset[str] = frozenset()
    listed: frozenset[str] = frozenset()
    """The queues it has a ``celery_worker_queue_info`` series for."""


def _count(value: Any) -> int | None:
    """A non-negative integer as Celery reports it, or None for anything else."""
    return value if type(value) is int and value >= 0 else None


def pool_size(stats: Mapping[str, Any]) -> int | None:
    """The pool's slots: the autoscaler's current maximum, else the pool's ``max-concurrency``
    (solo: 1; threads, gevent, eventlet: their limit)."""
    autoscaler = stats.get("autoscaler")
    if isinstance(autoscaler, dict) and _count(autoscaler.get("max")) is not None:
        return autoscaler["max"]
    pool = stats.get("pool")
    return _count(pool.get("max-concurrency")) if isinstance(pool, dict) else None


class Round:
    """The replies of one round, applied to the workers' capacity as they arrive."""

    def __init__(
        self,
        capacity: dict[str, Capacity],
        label: Callable[[str, str], str],
        expected: set[str],
        invalid: Callable[[str], None],
    ) -> None:
        self.capacity = capacity
        self.label = label
        self.waiting = set(expected)
        self.expected = bool(expected)
        self.invalid = invalid
        self.answered: dict[str, set[str]] = {}
        self.views: dict[str, WorkerView] = {}
        """What each worker runs and holds, for the tracker."""

    def on_reply(self, command: str, message: Message) -> bool:
        """Apply one reply message; True once every expected worker answered every command."""
        try:
            limit = MAX_TASKS_REPLY_BYTES if command in reconcile.COMMANDS else MAX_BODY_BYTES
            payloads = decode_body(message.body, message.content_type, limit)
        except InvalidMessage as exc:
            self.invalid(exc.reason)
            payloads = []
        for payload in payloads:
            if type(payload) is not dict:
                self.invalid(MALFORMED)
                continue
            for hostname, reply in payload.items():
                if type(hostname) is not str or not hostname:
                    self.invalid(MALFORMED)
                    continue
                self._apply(command, hostname, reply)
        return self.expected and not self.waiting

    def _apply(self, command: str, hostname: str, reply: Any) -> None:
        host = self.label("hostname", hostname)
        if host == OTHER and hostname != OTHER:
            return  # past the label limit: its capacity would count for every folded worker
        capacity = self.capacity.get(host)
        if capacity is None:
            capacity = self.capacity[host] = Capacity()
        if command == STATS:
            self._stats(capacity, reply)
        elif command == ACTIVE_QUEUES:
            self._queues(capacity, reply)
        else:
            self._tasks(host, command, reply)
        commands = self.answered.setdefault(host, set())
        commands.add(command)
        if len(commands) == len(COMMANDS):
            self.waiting.discard(host)

    def _stats(self, capacity: Capacity, stats: Any) -> None:
        if type(stats) is not dict:
            self.invalid(WRONG_TYPE)
            capacity.pool = capacity.prefetch = None
            return
        capacity.pool = pool_size(stats)
        capacity.prefetch = _count(stats.get("prefetch_count"))
        if capacity.pool is None or capacity.prefetch is None:
            self.invalid(MISSING_FIELD)

    def _tasks(self, host: str, command: str, reply: Any) -> None:
        view = self.views.get(host)
        if view is None:
            view = self.views[host] = WorkerView()
        if command in view.answered:
            return  # one reply per command and worker: two workers of one name are not told apart
        found = reconcile.requests(reply, self.invalid, scheduled=command == reconcile.SCHEDULED)
        (view.active if command == reconcile.ACTIVE else view.waiting).extend(found)
        if type(reply) is list:
            view.answered.add(command)

    def _queues(self, capacity: Capacity, queues: Any) -> None:
        if type(queues) is not list:
            self.invalid(WRONG_TYPE)
            capacity.queues = frozenset()
            return
        names = set()
        for queue in queues:
            name = queue.get("name") if type(queue) is dict else None
            if type(name) is str and name:
                names.add(self.label("queue", name))
            else:
                self.invalid(MISSING_FIELD)
        capacity.queues = frozenset(names)


class Inspector(Periodic):
    """Asks every worker for its capacity each interval and writes the capacity gauges."""

    name = "inspect"

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        tracker: Tracker,
        queues: Callable[[], Iterable[str]],
    ) -> None:
        super().__init__(config.inspect_interval)
        self.timeout = config.inspect_timeout
        self._control = ControlClient(config, config.inspect_timeout)
        self._tracker = tracker
        self._probed_queues = queues
        self._capacity: dict[str, Capacity] = {}
        self._counted: set[str] = set()
        self._failing = False
        self._pool = metrics.gauge("celery_worker_pool_size")
        self._prefetch = metrics.gauge("celery_worker_prefetch_limit")
        self._consumes = metrics.gauge("celery_worker_queue_info")
        self._queue_workers = metrics.gauge("celery_queue_workers")
        self._duration = metrics.histogram("celery_exporter_inspect_duration_seconds")
        self._replies = metrics.gauge("celery_exporter_inspect_replies")
        self._errors = metrics.counter("celery_exporter_inspect_errors_total")
        self._invalid = metrics.counter("celery_exporter_inspect_replies_invalid_total")
        for reason in (BROKER, TIMEOUT):
            self._errors.inc((reason,), 0)
        for reason in REPLY_REASONS:
            self._invalid.inc((reason,), 0)
        for reason in reconcile.REASONS:
            tracker.reconciled.inc((reason,), 0)

    def run_once(self) -> None:
        workers = self._tracker.workers.workers
        # Workers folded into 'other' cannot be told apart: none of them is awaited.
        expected = {host for host, worker in list(workers.items()) if worker.up} - {OTHER}
        current = Round(self._capacity, self._tracker.label, expected, self._count_invalid)
        before = InFlight.of(self._tracker)  # before the broadcast: see reconcile
        started = time.perf_counter()
        try:
            self._control.ask(COMMANDS, self.timeout, current.on_reply, self.stopping)
        except Exception as exc:
            self._errors.inc((BROKER,))
            self._control.close()  # start over with a fresh connection
            self._log_failure(f"{type(exc).__name__}: {exc}")
        else:
            if current.waiting and not self.stopping.is_set():
                self._errors.inc((TIMEOUT,))
                missing = ", ".join(sorted(current.waiting)[:5])
                self._log_failure(f"no reply within {self.timeout:g} s from {missing}")
            elif self._failing:
                self._failing = False
                log.info("inspect: every worker answers again")
        self._duration.observe((), time.perf_counter() - started)
        self._replies.set((), len(current.answered))
        self._export(set(current.answered))
        if current.views and not self.stopping.is_set():
            due = time.time() + reconcile.SETTLE_SECONDS
            self._tracker.reconciliations.append(Reconciliation(due, before, current.views))

    def _export(self, answered: set[str]) -> None:
        """Write the capacity series of the workers known now, and the queue coverage."""
        workers = self._tracker.workers.workers
        consumers: Counter[str] = Counter()
        for host, capacity in list(self._capacity.items()):
            key = (host,)
            worker = workers.get(host)
            if worker is None and host not in answered:
                # Purged by the tracker, or never seen in events and silent now.
                del self._capacity[host]
                self._tracker.label.release("hostname", host)
                self._pool.remove(key)
                self._prefetch.remove(key)
                for queue in capacity.listed:
                    self._consumes.remove((host, queue))
                continue
            _set(self._pool, key, capacity.pool)
            _set(self._prefetch, key, capacity.prefetch)
            # A worker counts for its queues while it is alive: up, or answering.
            live = worker is None or worker.up
            queues = capacity.queues if live else frozenset()
            for queue in capacity.listed - queues:
                self._consumes.remove((host, queue))
            for queue in queues:
                self._consumes.set((host, queue), 1)
            capacity.listed = queues
            consumers.update(queues)
        covered = {*self._probed_queues(), *consumers}
        for queue in self._counted - covered:
            self._queue_workers.remove((queue,))
        for queue in covered:
            self._queue_workers.set((queue,), consumers[queue])
        self._counted = covered

    def _count_invalid(self, reason: str) -> None:
        self._invalid.inc((reason,))

    def _log_failure(self, detail: str) -> None:
        if not self._failing:
            self._failing = True
            log.warning(
                "inspect: %s; further failures are only counted in "
                "celery_exporter_inspect_errors_total until a round succeeds",
                detail,
            )

    def close(self) -> None:
        self._control.close()


def _set(gauge: Gauge, key: tuple[str, ...], value: int | None) -> None:
    """A known value, or no series: an unknown capacity is absent, not stale."""
    if value is None:
        gauge.remove(key)
    else:
        gauge.set(key, value)
