"""Flower 2.x's metric families, computed from the same events (``--flower-metrics``).

Flower's Grafana dashboard, its alert examples and Datadog's Celery check read
Flower's ``/metrics``; these families let them read the exporter unchanged.
Names, types, label names and meanings follow Flower's ``PrometheusMetrics``,
poor ones included: the prefetch time is the last task's only, a worker stays
online until it says goodbye, and the prefetched count is never corrected for
a lost worker. The exporter's own families stay the ones to build on.

The hooks run after the tracker's handlers, on the same record and event, and
are chained only when the option is on: off, events pay nothing for them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from ..track.labels import LabelLimiter
from ..track.task import FINAL, Event, Hook, Task, WorkerHandler
from .metrics import Metrics

TASK_TYPES = (
    "task-sent", "task-received", "task-started", "task-succeeded", "task-failed",
    "task-retried", "task-rejected", "task-revoked",
)  # fmt: skip
CLIENT = "client"
"""The label limiter's key for the hostnames of task-sent (clients): they send no
heartbeats and are never purged, so they must not take the workers' slots."""


class FlowerMetrics:
    """Flower's families, fed by hooks on the tracker's task and worker handlers."""

    def __init__(self, metrics: Metrics, max_tasks: int) -> None:
        self._forget = metrics.forget
        self._events = metrics.counter("flower_events_total")
        self._events_created = metrics.gauge("flower_events_created")
        self._runtime = metrics.histogram("flower_task_runtime_seconds")
        self._runtime_created = metrics.gauge("flower_task_runtime_seconds_created")
        self._prefetch_time = metrics.gauge("flower_task_prefetch_time_seconds")
        self._prefetched = metrics.gauge("flower_worker_prefetched_tasks")
        self._online = metrics.gauge("flower_worker_online")
        self._executing = metrics.gauge("flower_worker_number_of_currently_executing_tasks")
        self.max_tasks = max_tasks
        self.received: dict[str, float] = {}
        """The last task-received time of each task not yet finished, as Flower's state
        keeps it: the tracker's own forgets it at a retry, which may arrive after the
        next task-received. Oldest first, at most ``max_tasks``."""

    def hooks(self, label: LabelLimiter) -> tuple[Mapping[str, Hook], Mapping[str, WorkerHandler]]:
        """A hook per task and per worker event type; hostnames are bounded by ``label``."""
        events, runtime, received = self._events, self._runtime, self.received
        events_created, runtime_created = self._events_created, self._runtime_created
        prefetch_time, prefetched = self._prefetch_time, self._prefetched
        online, executing = self._online, self._executing

        def task_hook(kind: str) -> Hook:
            role = CLIENT if kind == "task-sent" else "hostname"
            timed = kind == "task-succeeded"  # the one event Celery gives a runtime
            final = kind in FINAL
            prefetch = kind in PREFETCH_TYPES

            def hook(task: Task, event: Event) -> None:
                worker = label(role, event["hostname"])
                series, counted = (worker, task.name), (worker, kind, task.name)
                if counted not in events.values:
                    events_created.set(counted, time.time())
                events.inc(counted)
                if timed and event["runtime"]:
                    if series not in runtime.values:
                        runtime_created.set(series, time.time())
                    runtime.observe(series, event["runtime"])
                if not prefetch:
                    return
                uuid = event["uuid"]
                if kind == "task-received":
                    self._receive(uuid, event["timestamp"])
                since = received.pop(uuid, None) if final else received.get(uuid)
                # Flower keeps prefetch figures only for tasks received without an ETA.
                if since is None or task.eta is not None:
                    return
                if kind == "task-received":
                    prefetched.inc(series)
                elif kind == "task-started":
                    prefetch_time.set(series, event["timestamp"] - since)
                    prefetched.inc(series, -1)
                elif kind in ("task-succeeded", "task-failed"):
                    if task.started is not None:
                        prefetch_time.set(series, 0)
                elif task.started is None:  # revoked or rejected before it ever started
                    prefetched.inc(series, -1)

            return hook

        def on_online(event: Event, arrival: float) -> None:
            online.set((label("hostname", event["hostname"]),), 1)

        def on_heartbeat(event: Event, arrival: float) -> None:
            worker = (label("hostname", event["hostname"]),)
            online.set(worker, 1)
            active = event.get("active")
            if active is not None:
                executing.set(worker, active)

        def on_offline(event: Event, arrival: float) -> None:
            online.set((label("hostname", event["hostname"]),), 0)

        task_hooks = {kind: task_hook(kind) for kind in TASK_TYPES}
        worker_hooks = {"worker-online": on_online, "worker-heartbeat": on_heartbeat,
                        "worker-offline": on_offline}  # fmt: skip
        return task_hooks, worker_hooks

    def forget(self, hostname: str) -> None:
        """Drop the series of a purged worker."""
        self._forget("worker", hostname)

    def _receive(self, uuid: str, timestamp: float) -> None:
        received = self.received
        received.pop(uuid, None)  # to the young end
        received[uuid] = timestamp
        if len(received) > self.max_tasks:
            del received[next(iter(received))]


PREFETCH_TYPES = frozenset({
    "task-received", "task-started", "task-succeeded", "task-failed", "task-revoked",
    "task-rejected",
})  # fmt: skip
