"""From validated events to metric updates.

A bounded LRU table of in-flight tasks keeps what later events need but do
not carry: only ``task-sent`` and ``task-received`` name the task, only
``task-sent`` names its queue. Finished tasks leave the table at once, so
it holds only what is really in flight (plus what it never saw finish).
"""

from __future__ import annotations

import heapq
import logging
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from time import time
from typing import Any, TypeVar

from ..telemetry.metrics import Counter, Gauge, LabelValues, Metrics
from .hostnames import KEEP, Rewrite, fold_task_hostname
from .labels import OTHER, LabelLimiter
from .missed import MissedEvents
from .objectives import TaskTargets
from .task import (
    FINAL,
    UNKNOWN,
    Event,
    FlowerHooks,
    SpanHooks,
    Task,
    TaskHandler,
    WorkerHandler,
    eta_timestamp,
    exception_class,
)
from .workers import WorkerTracker

log = logging.getLogger(__name__)

RECENTLY_FINISHED = 10_000
"""Finished tasks remembered for late events: a ``Reject`` sends task-failed, then
task-rejected, and events published by other processes may trail the final one."""
HOLD_SECONDS = 2.0
MAX_HELD_TASKS = 10_000
"""Clients, workers and pool processes publish on connections of their own, so a
task's events can overtake the event that names it (on AMQP, a task may finish
before its task-sent arrives). Events of a task not yet named wait for it this
long, for at most this many tasks, then count as they are."""
LOGGED_IDS = 5
"""Task ids named in the log line of a lost worker."""
MIN_LOST_GRACE = 10.0
"""A worker declared down may be paused, not dead (a GC pause, a frozen VM, a
partition): its running tasks count as interrupted only once it has stayed silent
for another ``worker_timeout``, at least this long, or came back as a new process."""
_OTHER = (OTHER,)


A, B = TypeVar("A"), TypeVar("B")


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
        task_hostname_label: str = KEEP,
        task_hostname_rewrite: Sequence[Rewrite] = (),
        flower: FlowerHooks | None = None,
        recent_tasks: int = 0,
        task_objectives: Mapping[str, float] | None = None,
        task_expected_intervals: Mapping[str, float] | None = None,
    ) -> None:
        self.metrics = metrics
        self.spans = spans
        self.flower = flower
        self.max_tracked_tasks = max_tracked_tasks
        self.default_queue = default_queue
        self.tasks: OrderedDict[str, Task] = OrderedDict()
        self._finished: OrderedDict[str, Task] = OrderedDict()
        # Lookups serve the last ``recent_tasks`` finished; late events need the last 10,000.
        self._keep_finished = max(recent_tasks, RECENTLY_FINISHED)
        self._held: dict[str, tuple[float, list[tuple[Event, float]]]] = {}
        self._sent_seen = False
        self.workers = WorkerTracker(
            metrics, timeout=worker_timeout, purge_after=purge_offline_after
        )
        self.label = LabelLimiter(
            max_label_values, metrics.counter("celery_exporter_label_values_folded_total")
        )
        self._task_hosts = fold_task_hostname(
            metrics, task_hostname_label, task_hostname_rewrite, max_label_values
        )
        self._queue_by_name: dict[str, str] = {}
        self._prefetched: dict[str, int] = {}
        self._scheduled: dict[str, int] = {}
        self._etas: list[tuple[float, str]] = []  # (ETA, uuid) of scheduled tasks, a heap
        self._lost: dict[str, float] = {}  # workers declared down, since when
        self._lost_grace = max(worker_timeout, MIN_LOST_GRACE)
        self.reconciliations: deque[Any] = deque()
        """Views of the workers' own task lists, appended by the inspect thread and
        applied at the tick once due (``exporter.track.reconcile``)."""
        # Tasks running now, by (name, queue), in the order their task-started arrived.
        self.running: defaultdict[LabelValues, dict[str, Task]] = defaultdict(dict)
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
        self.running_gauge = metrics.gauge("celery_task_running")
        self._oldest_gauge = metrics.gauge("celery_task_oldest_running_start_timestamp_seconds")
        self._prefetch_wait = histogram("celery_task_prefetch_wait_seconds")
        self._queue_wait = histogram("celery_task_queue_wait_seconds")
        self._prefetched_gauge = metrics.gauge("celery_worker_tasks_prefetched")
        self._scheduled_gauge = metrics.gauge("celery_worker_tasks_scheduled")
        self._tracked = metrics.gauge("celery_exporter_tracked_tasks")
        self._evicted = counter("celery_exporter_tracked_tasks_evicted_total")
        self.reconciled = counter("celery_exporter_tasks_reconciled_total")
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
            "worker-online": self._on_online,
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
        if flower is not None:
            self._chain_flower(flower)
        if recent_tasks:  # last: the hooks drop what the span hooks and the failure list read
            from .recent import RECORD_HOOKS

            for kind, hook in RECORD_HOOKS.items():
                self._on_task[kind] = _then(self._on_task[kind], hook)

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
            self._lost[hostname] = now
        for hostname, since in list(self._lost.items()):
            if now - since >= self._lost_grace:
                self._interrupt(hostname, f"silent for {self._lost_grace:g} s after it was down")
        for hostname in purged:
            # A worker that said goodbye finished its tasks first; any still marked
            # running had their last events lost, and leave the figures uncounted.
            for uuid, task in self._running_on(hostname):
                self.stop_running(uuid, task)
            self._lost.pop(hostname, None)
            self._prefetched.pop(hostname, None)
            self._scheduled.pop(hostname, None)
            self._missed.forget(hostname)
            self.metrics.forget("hostname", hostname)
            if self._task_hosts is not None:
                self._task_hosts.pop(hostname, None)
            if self.flower is not None:
                self.flower.forget(hostname)
            self.label.release("hostname", hostname)
        held = self._held
        while held:
            uuid, (since, _) = next(iter(held.items()))
            if now - since < HOLD_SECONDS:
                break
            self._release(uuid)
        etas = self._etas
        while etas and etas[0][0] <= now:
            self._eta_reached(*heapq.heappop(etas))
        reconciliations = self.reconciliations
        while reconciliations and reconciliations[0].due <= now:
            reconciliations.popleft().apply(self, now)
        self._tracked.set((), len(self.tasks))
        self._count_running()
        if self._targets is not None:
            self._targets.tick()

    def records(self) -> tuple[list[tuple[str, Task]], list[tuple[str, Task]]]:
        """Copies of the tasks in flight (least recently active first) and the finished ones
        (first finished first), for lookups from the HTTP threads; each copy is taken at
        once, under the interpreter lock."""
        return list(self.tasks.items()), list(self._finished.items())

    def record(self, uuid: str) -> Task | None:
        """One task's record, in flight or finished; safe from any thread."""
        return self.tasks.get(uuid) or self._finished.get(uuid)

    def queues_seen(self) -> set[str]:
        """Queues named by task-sent events, for the queue probes; safe from any thread."""
        return set(list(self._queue_by_name.values())) - {OTHER}

    # Task table.

    def is_held(self, uuid: str) -> bool:
        """Whether the task's events wait for the event that names it."""
        return uuid in self._held

    def finished(self, uuid: str) -> bool:
        return uuid in self._finished

    def track(self, uuid: str) -> Task:
        """A new record in the table, for a task first seen in an event or told of by its
        worker (inspect); the least recently active goes when the table is full."""
        task = self.tasks[uuid] = Task(UNKNOWN, self.default_queue)
        if len(self.tasks) > self.max_tracked_tasks:
            self._evict()
        return task

    def name_from_worker(self, task: Task, name: str | None, queue: str | None) -> None:
        """Name a task, and give it its queue, from what its worker reported."""
        self._name(task, name)
        if queue and task.sent is None:
            task.queue = self.label("queue", queue)

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
            task = Task(UNKNOWN, self.default_queue) if kind in FINAL else self.track(uuid)
        self._on_task[kind](task, event)

    def _finish(self, uuid: str, task: Task) -> Task:
        """Move a task that reached a final state from the table to the recently finished."""
        del self.tasks[uuid]
        self.unprefetch(task)
        if task.running is not None:
            self.running[task.running].pop(uuid, None)
            task.running = None
        task.done = True
        finished = self._finished
        finished[uuid] = task
        if len(finished) > self._keep_finished:
            finished.popitem(last=False)
        return task

    def _evict(self) -> None:
        uuid, task = self.tasks.popitem(last=False)
        self.unprefetch(task)
        if task.running is not None:
            self.stop_running(uuid, task)
        self._evicted.inc()
        if self.spans is not None:
            self.spans.evicted(task)

    def _trace(self, spans: SpanHooks) -> None:
        """Chain the span hooks to the task handlers, once: untraced, events pay nothing."""
        for kind, hook in spans.hooks().items():
            self._on_task[kind] = _then(self._on_task[kind], hook)

    def _chain_flower(self, flower: FlowerHooks) -> None:
        """Chain Flower's hooks to the task and worker handlers, once: off, events pay nothing."""
        task_hooks, worker_hooks = flower.hooks(self.label)
        for kind, hook in task_hooks.items():
            self._on_task[kind] = _then(self._on_task[kind], hook)
        for kind, worker_hook in worker_hooks.items():
            self._on_worker[kind] = _then(self._on_worker[kind], worker_hook)

    def _name(self, task: Task, name: str | None) -> None:
        """Record the task's name; its queue, unless task-sent gave one, follows it."""
        if not name:
            return
        task.name = self.label("name", name)
        if task.sent is None:
            task.queue = self._queue_by_name.get(task.name, self.default_queue)

    def prefetch(self, task: Task, hostname: str) -> None:
        """The task waits in the worker's prefetch buffer for a pool slot."""
        if task.prefetched_on is None and task.scheduled_on is None and not task.done:
            task.prefetched_on = hostname
            count = self._prefetched[hostname] = self._prefetched.get(hostname, 0) + 1
            self._prefetched_gauge.set((hostname,), count)

    def schedule(self, task: Task, uuid: str, hostname: str, eta: float) -> None:
        """The task waits in the worker for its ETA (a countdown, a retry's delay)."""
        if task.prefetched_on is None and task.scheduled_on is None and not task.done:
            task.scheduled_on = hostname
            count = self._scheduled[hostname] = self._scheduled.get(hostname, 0) + 1
            self._scheduled_gauge.set((hostname,), count)
            etas = self._etas
            heapq.heappush(etas, (eta, uuid))
            if len(etas) > 2 * self.max_tracked_tasks:  # tasks that left the table meanwhile
                etas[:] = [(at, key) for at, key in etas if key in self.tasks]
                heapq.heapify(etas)

    def unprefetch(self, task: Task) -> None:
        """The task no longer waits in a worker: it started, ended, or left it."""
        hostname = task.prefetched_on
        if hostname is not None:
            task.prefetched_on = None
            _decrement(self._prefetched, self._prefetched_gauge, hostname)
        hostname = task.scheduled_on
        if hostname is not None:
            task.scheduled_on = None
            _decrement(self._scheduled, self._scheduled_gauge, hostname)

    def _eta_reached(self, eta: float, uuid: str) -> None:
        """A scheduled task whose ETA passed waits for a pool slot like any other."""
        task = self.tasks.get(uuid)
        if task is not None and task.scheduled_on is not None and task.eta == eta:
            hostname = task.scheduled_on
            self.unprefetch(task)
            self.prefetch(task, hostname)

    # Tasks in flight.

    def stop_running(self, uuid: str, task: Task) -> None:
        """The task's execution ended (retried, evicted or its worker lost; ``_finish``
        does the same inline)."""
        self.running[task.running].pop(uuid, None)  # type: ignore[index]
        task.running = None

    def adopt_running(self, uuid: str, task: Task, hostname: str, started: float) -> None:
        """A task its worker runs that no event said started: it runs from ``started``."""
        self.unprefetch(task)
        task.started = started
        task.worker = hostname
        key = task.running = (task.name, task.queue)
        running = self.running[key]
        first = next(iter(running.values()), None)
        if first is not None and first.started is not None and started < first.started:
            self.running[key] = {uuid: task, **running}  # the oldest comes first
        else:
            running[uuid] = task

    def _count_running(self) -> None:
        """Set the running gauges from the running tasks: at the tick, never per event."""
        running_gauge, oldest_gauge = self.running_gauge, self._oldest_gauge
        for key, running in list(self.running.items()):
            running_gauge.set(key, len(running))
            if running:
                # The earliest to arrive is the oldest, clock skew between workers aside.
                oldest_gauge.set(key, next(iter(running.values())).started)
            else:
                oldest_gauge.remove(key)
                del self.running[key]

    def _running_on(self, hostname: str) -> list[tuple[str, Task]]:
        return [
            (uuid, task)
            for running in self.running.values()
            for uuid, task in running.items()
            if task.worker == hostname
        ]

    def _interrupt(self, hostname: str, why: str) -> None:
        """The worker is gone: its running tasks are interrupted, its waiting ones freed.

        The broker gives prefetched tasks (and, with ``acks_late``, running ones) to
        another worker; their records stay, so a later event counts as usual.
        """
        self._lost.pop(hostname, None)
        interrupted = self._running_on(hostname)
        for uuid, task in interrupted:
            self.stop_running(uuid, task)
            self._interrupted.inc((task.name, hostname, task.queue))
            if self.spans is not None:
                self.spans.interrupted(task, hostname)
        if interrupted:
            ids = ", ".join(uuid for uuid, _ in interrupted[:LOGGED_IDS])
            more = ", …" if len(interrupted) > LOGGED_IDS else ""
            log.warning("worker %s lost (%s) with %d tasks running, counted as interrupted: "
                        "%s%s", hostname, why, len(interrupted), ids, more)  # fmt: skip
        if self._prefetched.get(hostname) or self._scheduled.get(hostname):
            for task in self.tasks.values():
                if hostname in (task.prefetched_on, task.scheduled_on):
                    self.unprefetch(task)

    # Event handlers, one per type.

    def _on_sent(self, task: Task, event: Event) -> None:
        self._sent_seen = True
        task.sent = event["timestamp"]
        task.eta = eta_timestamp(event.get("eta"))
        self._name(task, event.get("name"))
        queue = event.get("queue")
        if queue:
            task.queue = self._queue_by_name[task.name] = self.label("queue", queue)
        self._sent.inc((task.name, task.queue))

    def _on_received(self, task: Task, event: Event) -> None:
        self._name(task, event.get("name"))
        hostname = self.label("hostname", event["hostname"])
        received = task.received = event["timestamp"]
        eta = event.get("eta")
        if eta:  # this delivery's: a retry's replaces the first's
            task.eta = eta_timestamp(eta)
        if task.eta is not None and task.eta > received:
            self.schedule(task, event["uuid"], hostname, task.eta)
        else:
            self.prefetch(task, hostname)
        self._received.inc((task.name, hostname, task.queue))

    def _on_started(self, task: Task, event: Event) -> None:
        hostname = self.label("hostname", event["hostname"])
        started = event["timestamp"]
        self.unprefetch(task)
        key = (task.name, task.queue)
        self._started.inc((task.name, hostname, task.queue))
        if not self._starts_counted:
            self._missed.started(hostname, started)
        task.started = started
        task.worker = hostname
        if not task.done:
            uuid = event["uuid"]
            if task.running is not None:  # started again without a retry: a redelivery
                self.stop_running(uuid, task)
            self.running[key][uuid] = task
            task.running = key
        if task.received is not None:  # from the ETA, for a task held until then
            ready = max(task.received, task.eta or 0.0)
            self._prefetch_wait.observe(key, max(0.0, started - ready))
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
        # The worker reports the retry once the pool hands it back, often after the
        # retry's own delivery was received: that delivery stays waiting.
        received, started = task.received, task.started
        if received is None or started is None or received <= started:
            self.unprefetch(task)
            task.received = None
        if task.running is not None:
            self.stop_running(event["uuid"], task)
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
        if hostname in self._lost:  # down, and back: paused, or started again?
            if self.workers.restarted(hostname, event):
                self._interrupt(hostname, "it came back as a new process")
            else:
                del self._lost[hostname]
                log.info("worker %s is back: it was paused, not lost; nothing interrupted",
                         hostname)  # fmt: skip
        self.workers.heartbeat(hostname, event, arrival)
        if hostname != OTHER:  # folded workers' counts cannot be told apart
            self._missed.heartbeat(hostname, event["timestamp"], event.get("processed"))
        self._prefetched_gauge.set((hostname,), self._prefetched.get(hostname, 0))
        self._scheduled_gauge.set((hostname,), self._scheduled.get(hostname, 0))

    def _on_online(self, event: Event, arrival: float) -> None:
        """A worker (re)started; one whose process changed lost what its last one ran."""
        hostname = self.label("hostname", event["hostname"])
        if hostname != OTHER and self.workers.restarted(hostname, event):
            self._interrupt(hostname, "it started again as a new process")
        self._on_heartbeat(event, arrival)

    def _on_offline(self, event: Event, arrival: float) -> None:
        self.workers.offline(self.label("hostname", event["hostname"]), arrival)


def _decrement(counts: dict[str, int], gauge: Gauge, hostname: str) -> None:
    count = counts.get(hostname)
    if count:
        counts[hostname] = count - 1
        gauge.set((hostname,), count - 1)


def _then(handler: Callable[[A, B], None], hook: Callable[[A, B], None]) -> Callable[[A, B], None]:
    """The handler, then the hook, on the same record (or worker event) and event."""

    def traced(task: A, event: B) -> None:
        handler(task, event)
        hook(task, event)

    return traced
