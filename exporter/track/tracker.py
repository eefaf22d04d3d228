"""From validated events to metric updates.

A bounded LRU table of in-flight tasks keeps what later events need but do
not carry: only ``task-sent`` and ``task-received`` name the task, only
``task-sent`` names its queue. Finished tasks leave the table at once, so
it holds only what is really in flight (plus what it never saw finish).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from time import time
from typing import Any, Protocol

from ..telemetry.metrics import Counter, LabelValues, Metrics
from .labels import OTHER, LabelLimiter
from .missed import MissedEvents
from .objectives import TaskTargets
from .workers import WorkerTracker

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
RECENTLY_FINISHED = 10_000
"""Finished tasks remembered for late events: a ``Reject`` sends task-failed, then
task-rejected, and events published by other processes may trail the final one."""
HOLD_SECONDS = 2.0
MAX_HELD_TASKS = 10_000
"""Clients, workers and pool processes publish on connections of their own, so a
task's events can overtake the event that names it (on AMQP, a task may finish
before its task-sent arrives). Events of a task not yet named wait for it this
long, for at most this many tasks, then count as they are."""
Event = dict[str, Any]
LOGGED_IDS = 5
"""Task ids named in the log line of a lost worker."""
_OTHER = (OTHER,)
FINAL = frozenset({"task-succeeded", "task-failed", "task-rejected", "task-revoked"})


class Task:
    """One in-flight task: the fields later events refer back to.

    ``trace`` belongs to the span hooks (``exporter.telemetry.tracing``): None
    until they see the task.
    """

    __slots__ = ("done", "eta", "name", "prefetched_on", "queue", "received", "running", "sent",
                 "started", "trace", "worker")  # fmt: skip

    def __init__(self, name: str, queue: str) -> None:
        self.name = name
        self.queue = queue
        self.sent: float | None = None
        self.eta: float | None = None
        self.received: float | None = None
        self.prefetched_on: str | None = None
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
    """What the tracker calls when traces are on (``exporter.telemetry.tracing.Spans``)."""

    def hooks(self) -> Mapping[str, Hook]:
        """A hook per task event type, given the task's record and the event."""

    def evicted(self, task: Task) -> None:
        """The task left the full table unfinished."""

    def interrupted(self, task: Task, hostname: str) -> None:
        """The worker running the task was lost: end its execution span with an error."""

    def close(self) -> None:
        """Export what is pending: the daemon is stopping."""


class Tracker:
    """Applies each event to the task table, the workers and the metrics."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        max_tracked_tasks: int,
        default_queue: str,
        worker_timeout: float,
        purge_offline_after: float,
        max_label_values: int,
        spans: SpanHooks | None = None,
        on_failure: TaskHandler | None = None,
        task_objectives: Mapping[str, float] | None = None,
        task_expected_intervals: Mapping[str, float] | None = None,
    ) -> None:
        self.metrics = metrics
        self.spans = spans
        self.max_tracked_tasks = max_tracked_tasks
        self.default_queue = default_queue
        self.tasks: OrderedDict[str, Task] = OrderedDict()
        self._finished: OrderedDict[str, Task] = OrderedDict()
        self._held: dict[str, tuple[float, list[tuple[Event, float]]]] = {}
        self._sent_seen = False
        self.workers = WorkerTracker(
            metrics, timeout=worker_timeout, purge_after=purge_offline_after
        )
        self.label = LabelLimiter(
            max_label_values, metrics.counter("celery_exporter_label_values_folded_total")
        )
        self._queue_by_name: dict[str, str] = {}
        self._prefetched: dict[str, int] = {}
        # Tasks running now, by (name, queue), in the order their task-started arrived.
        self._running: defaultdict[LabelValues, dict[str, Task]] = defaultdict(dict)
        counter, histogram = metrics.counter, metrics.histogram
        self._events = counter("celery_exporter_events_total")
        self._lag = histogram("celery_exporter_event_lag_seconds")
        self._sent = counter("celery_task_sent_total")
        self._received = counter("celery_task_received_total")
        self._started = counter("celery_task_started_total")
        self._succeeded = counter("celery_task_succeeded_total")
        self._failed = counter("celery_task_failed_total")
        self._retried = counter("celery_task_retried_total")
        self._rejected = counter("celery_task_rejected_total")
        self._revoked = counter("celery_task_revoked_total")
        self._runtime = histogram("celery_task_runtime_seconds")
        self._last_succeeded = metrics.gauge("celery_task_last_succeeded_timestamp_seconds")
        self._failed_runtime = histogram("celery_task_failed_runtime_seconds")
        self._interrupted = counter("celery_task_interrupted_total")
        self._missed = MissedEvents(counter("celery_exporter_events_missed_total"))
        self._starts_counted = False  # True while held events, counted on arrival, apply
        self._running_gauge = metrics.gauge("celery_task_running")
        self._oldest_gauge = metrics.gauge("celery_task_oldest_running_start_timestamp_seconds")
        self._prefetch_wait = histogram("celery_task_prefetch_wait_seconds")
        self._queue_wait = histogram("celery_task_queue_wait_seconds")
        self._prefetched_gauge = metrics.gauge("celery_worker_tasks_prefetched")
        self._tracked = metrics.gauge("celery_exporter_tracked_tasks")
        self._evicted = counter("celery_exporter_tracked_tasks_evicted_total")
        self._on_task: dict[str, TaskHandler] = {
            "task-sent": self._on_sent,
            "task-received": self._on_received,
            "task-started": self._on_started,
            "task-succeeded": self._on_succeeded,
            "task-failed": self._on_failed,
            "task-retried": self._on_retried,
            "task-rejected": self._on_rejected,
            "task-revoked": self._on_revoked,
        }
        self._on_worker: dict[str, WorkerHandler] = {
            "worker-online": self._on_heartbeat,
            "worker-heartbeat": self._on_heartbeat,
            "worker-offline": self._on_offline,
        }
        self._type_labels = {kind: (kind,) for kind in (*self._on_task, *self._on_worker)}
        if spans is not None:
            self._trace(spans)
        if on_failure is not None:  # chained once, like the span hooks: off costs nothing
            self._on_task["task-failed"] = _then(self._on_task["task-failed"], on_failure)
        self._targets = None  # matched at the tick, never per event; off without globs
        if task_objectives or task_expected_intervals:
            self._targets = TaskTargets(metrics, task_objectives or {},
                                        task_expected_intervals or {},
                                        self.label.admitted("name"))  # fmt: skip

    def handle(self, event: Event, arrival: float) -> None:
        """Apply one event that passed ``decode.check_event``."""
        kind = event["type"]
        self._events.inc(self._type_labels.get(kind, _OTHER))
        self._lag.observe((), arrival - event["timestamp"])
        on_task = self._on_task.get(kind)
        if on_task is None:
            on_worker = self._on_worker.get(kind)
            if on_worker is not None:
                on_worker(event, arrival)
            return
        uuid = event["uuid"]
        task = self.tasks.get(uuid)
        if task is None:
            self._first_sight(kind, event, arrival)
        elif kind in FINAL:
            on_task(self._finish(uuid, task), event)
        else:
            self.tasks.move_to_end(uuid)  # the table evicts the least recently used
            on_task(task, event)

    def tick(self, now: float) -> None:
        """Periodic upkeep: worker liveness, held events and the in-flight gauges."""
        lost, purged = self.workers.expire(now)
        for hostname in lost:
            self._lose(hostname)
        for hostname in purged:
            # A worker that said goodbye finished its tasks first; any still marked
            # running had their last events lost, and leave the figures uncounted.
            for uuid, task in self._running_on(hostname):
                self._stop_running(uuid, task)
            self._prefetched.pop(hostname, None)
            self._missed.forget(hostname)
            self.metrics.forget("hostname", hostname)
            self.label.release("hostname", hostname)
        held = self._held
        while held:
            uuid, (since, _) = next(iter(held.items()))
            if now - since < HOLD_SECONDS:
                break
            self._release(uuid)
        self._tracked.set((), len(self.tasks))
        self._count_running()
        if self._targets is not None:
            self._targets.tick()

    def queues_seen(self) -> set[str]:
        """Queues named by task-sent events, for the queue probes; safe from any thread."""
        return set(list(self._queue_by_name.values())) - {OTHER}

    # Task table.

    def _first_sight(self, kind: str, event: Event, arrival: float) -> None:
        """An event of a task not in the table: apply it, or hold it until the task is named."""
        uuid = event["uuid"]
        names = kind == "task-sent" or (kind == "task-received" and not self._sent_seen)
        held = self._held
        if names or uuid in self._finished or (uuid not in held and len(held) >= MAX_HELD_TASKS):
            self._apply_unseen(kind, uuid, event)
            if names and held:
                self._release(uuid)
        else:
            if kind == "task-started":  # the missed-events check counts it on arrival
                self._missed.started(self.label("hostname", event["hostname"]),
                                     event["timestamp"])  # fmt: skip
            if uuid in held:
                held[uuid][1].append((event, arrival))
            else:
                held[uuid] = (arrival, [(event, arrival)])

    def _release(self, uuid: str) -> None:
        """Apply a task's held events in the order they arrived."""
        _, events = self._held.pop(uuid, (0.0, ()))
        self._starts_counted = True
        try:
            for event, _ in events:
                kind = event["type"]
                task = self.tasks.get(uuid)
                if task is None:
                    self._apply_unseen(kind, uuid, event)
                else:
                    self._on_task[kind](self._finish(uuid, task) if kind in FINAL else task, event)
        finally:
            self._starts_counted = False

    def _apply_unseen(self, kind: str, uuid: str, event: Event) -> None:
        """Apply an event of a task not in the table, making its record if need be.

        A task that already finished keeps its record out of the table: late
        events count under its name without tracking it again. A final event
        of a task never seen counts under a blank record.
        """
        task = self._finished.get(uuid)
        if task is None:
            task = Task(UNKNOWN, self.default_queue)
            if kind not in FINAL:
                tasks = self.tasks
                tasks[uuid] = task
                if len(tasks) > self.max_tracked_tasks:
                    self._evict()
        self._on_task[kind](task, event)

    def _finish(self, uuid: str, task: Task) -> Task:
        """Move a task that reached a final state from the table to the recently finished."""
        del self.tasks[uuid]
        self._unprefetch(task)
        if task.running is not None:
            self._running[task.running].pop(uuid, None)
            task.running = None
        task.done = True
        finished = self._finished
        finished[uuid] = task
        if len(finished) > RECENTLY_FINISHED:
            finished.popitem(last=False)
        return task

    def _evict(self) -> None:
        uuid, task = self.tasks.popitem(last=False)
        self._unprefetch(task)
        if task.running is not None:
            self._stop_running(uuid, task)
        self._evicted.inc()
        if self.spans is not None:
            self.spans.evicted(task)

    def _trace(self, spans: SpanHooks) -> None:
        """Chain the span hooks to the task handlers, once: untraced, events pay nothing."""
        for kind, hook in spans.hooks().items():
            self._on_task[kind] = _then(self._on_task[kind], hook)

    def _name(self, task: Task, name: str | None) -> None:
        """Record the task's name; its queue, unless task-sent gave one, follows it."""
        if not name:
            return
        task.name = self.label("name", name)
        if task.sent is None:
            task.queue = self._queue_by_name.get(task.name, self.default_queue)

    def _prefetch(self, task: Task, hostname: str) -> None:
        if task.prefetched_on is None and not task.done:
            task.prefetched_on = hostname
            count = self._prefetched[hostname] = self._prefetched.get(hostname, 0) + 1
            self._prefetched_gauge.set((hostname,), count)

    def _unprefetch(self, task: Task) -> None:
        hostname = task.prefetched_on
        if hostname is not None:
            task.prefetched_on = None
            count = self._prefetched.get(hostname)
            if count:
                self._prefetched[hostname] = count - 1
                self._prefetched_gauge.set((hostname,), count - 1)

    # Tasks in flight.

    def _stop_running(self, uuid: str, task: Task) -> None:
        """The task's execution ended (retried, evicted or its worker lost; ``_finish``
        does the same inline)."""
        self._running[task.running].pop(uuid, None)  # type: ignore[index]
        task.running = None

    def _count_running(self) -> None:
        """Set the running gauges from the running tasks: at the tick, never per event."""
        running_gauge, oldest_gauge = self._running_gauge, self._oldest_gauge
        for key, running in list(self._running.items()):
            running_gauge.set(key, len(running))
            if running:
                # The earliest to arrive is the oldest, clock skew between workers aside.
                oldest_gauge.set(key, next(iter(running.values())).started)
            else:
                oldest_gauge.remove(key)
                del self._running[key]

    def _running_on(self, hostname: str) -> list[tuple[str, Task]]:
        return [
            (uuid, task)
            for running in self._running.values()
            for uuid, task in running.items()
            if task.worker == hostname
        ]

    def _lose(self, hostname: str) -> None:
        """The worker is gone: its running tasks are interrupted, its prefetched ones freed.

        The broker gives prefetched tasks (and, with ``acks_late``, running ones) to
        another worker; their records stay, so a later event counts as usual.
        """
        interrupted = self._running_on(hostname)
        for uuid, task in interrupted:
            self._stop_running(uuid, task)
            self._interrupted.inc((task.name, hostname, task.queue))
            if self.spans is not None:
                self.spans.interrupted(task, hostname)
        if interrupted:
            ids = ", ".join(uuid for uuid, _ in interrupted[:LOGGED_IDS])
            more = ", …" if len(interrupted) > LOGGED_IDS else ""
            log.warning("worker %s lost with %d tasks running, counted as interrupted: %s%s",
                        hostname, len(interrupted), ids, more)  # fmt: skip
        if self._prefetched.get(hostname):
            for task in self.tasks.values():
                if task.prefetched_on == hostname:
                    task.prefetched_on = None
            self._prefetched[hostname] = 0
            self._prefetched_gauge.set((hostname,), 0)

    # Event handlers, one per type.

    def _on_sent(self, task: Task, event: Event) -> None:
        self._sent_seen = True
        task.sent = event["timestamp"]
        task.eta = _eta(event.get("eta"))
        self._name(task, event.get("name"))
        queue = event.get("queue")
        if queue:
            task.queue = self._queue_by_name[task.name] = self.label("queue", queue)
        self._sent.inc((task.name, task.queue))

    def _on_received(self, task: Task, event: Event) -> None:
        self._name(task, event.get("name"))
        hostname = self.label("hostname", event["hostname"])
        task.received = event["timestamp"]
        if task.eta is None:
            task.eta = _eta(event.get("eta"))
        self._prefetch(task, hostname)
        self._received.inc((task.name, hostname, task.queue))

    def _on_started(self, task: Task, event: Event) -> None:
        hostname = self.label("hostname", event["hostname"])
        started = event["timestamp"]
        self._unprefetch(task)
        key = (task.name, task.queue)
        self._started.inc((task.name, hostname, task.queue))
        if not self._starts_counted:
            self._missed.started(hostname, started)
        task.started = started
        task.worker = hostname
        if not task.done:
            uuid = event["uuid"]
            if task.running is not None:  # started again without a retry: a redelivery
                self._stop_running(uuid, task)
            self._running[key][uuid] = task
            task.running = key
        if task.received is not None:
            self._prefetch_wait.observe(key, max(0.0, started - task.received))
        if task.sent is not None:
            ready = max(task.sent, task.eta or 0.0)
            self._queue_wait.observe(key, max(0.0, started - ready))

    def _on_succeeded(self, task: Task, event: Event) -> None:
        hostname = self.label("hostname", event["hostname"])
        self._succeeded.inc((task.name, hostname, task.queue))
        key = (task.name, task.queue)
        self._runtime.observe(key, max(0.0, event["runtime"]))
        # The worker's clock, never ahead of this one: a worker clock hours fast must
        # not keep a periodic task that stopped looking fresh for hours.
        finished, now = event["timestamp"], time()
        self._last_succeeded.set(key, finished if finished < now else now)

    def _on_failed(self, task: Task, event: Event) -> None:
        hostname = self.label("hostname", event["hostname"])
        exception = self.label(
            "exception", exception_class(event.get("exception"), event.get("traceback"))
        )
        self._failed.inc((task.name, hostname, task.queue, exception))
        if task.started is not None:  # both stamped by the worker's clock
            self._failed_runtime.observe(
                (task.name, task.queue), max(0.0, event["timestamp"] - task.started)
            )

    def _on_retried(self, task: Task, event: Event) -> None:
        self._unprefetch(task)
        if task.running is not None:
            self._stop_running(event["uuid"], task)
        task.received = None
        hostname = self.label("hostname", event["hostname"])
        exception = self.label("exception", exception_class(event.get("exception")))
        self._retried.inc((task.name, hostname, task.queue, exception))

    def _on_rejected(self, task: Task, event: Event) -> None:
        self._ended(task, event, self._rejected)

    def _on_revoked(self, task: Task, event: Event) -> None:
        self._ended(task, event, self._revoked)

    def _ended(self, task: Task, event: Event, counter: Counter) -> None:
        """A final event that carries nothing but the task and the worker."""
        hostname = self.label("hostname", event["hostname"])
        counter.inc((task.name, hostname, task.queue))

    def _on_heartbeat(self, event: Event, arrival: float) -> None:
        hostname = self.label("hostname", event["hostname"])
        self.workers.heartbeat(hostname, event, arrival)
        if hostname != OTHER:  # folded workers' counts cannot be told apart
            self._missed.heartbeat(hostname, event["timestamp"], event.get("processed"))
        self._prefetched_gauge.set((hostname,), self._prefetched.get(hostname, 0))

    def _on_offline(self, event: Event, arrival: float) -> None:
        self.workers.offline(self.label("hostname", event["hostname"]), arrival)


def _then(handler: TaskHandler, hook: Hook) -> TaskHandler:
    """The handler, then the span hook, on the same record."""

    def traced(task: Task, event: Event) -> None:
        handler(task, event)
        hook(task, event)

    return traced


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


def _eta(value: str | None) -> float | None:
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
