"""Events the exporter never received, found from the workers' own counts.

A heartbeat's ``processed`` counts the tasks the worker has accepted, and a
task is accepted at the moment its ``task-started`` event is made, on the
same worker clock. So the ``task-started`` events stamped no later than a
heartbeat should number as many as that heartbeat's ``processed`` grew: what
is short was lost on the way (a Redis subscriber disconnected, AMQP messages
expired past the queue's TTL, the exporter paused).

Prefork workers buffer task events and send them in batches, so a batch can
arrive after a heartbeat that already counts it. A heartbeat is therefore
judged only when the next one arrives, against the events stamped no later
than it: a batch is flushed within a loop iteration, long before the next
heartbeat. Events that arrive before a heartbeat were made before it (one
worker, one connection, heartbeats never buffered), which is how the events
are split between heartbeats without remembering their timestamps.
"""

from __future__ import annotations

import logging

from ..logs import Throttle
from ..telemetry.metrics import Counter

log = logging.getLogger(__name__)

MAX_STARTS_PER_SECOND = 10_000
"""What one heartbeat may add to the count, per second since the worker's previous
heartbeat: a corrupt ``processed`` that jumps by billions cannot flood the counter."""


class _Worker:
    """The counts since a worker's baseline heartbeat."""

    __slots__ = ("after", "base_processed", "base_time", "before", "boundary", "missed",
                 "processed")  # fmt: skip

    def __init__(self, timestamp: float, processed: float) -> None:
        self.base_time = self.boundary = timestamp
        self.base_processed = self.processed = processed
        self.before = 0  # task-started stamped in (base_time, boundary]
        self.after = 0  # task-started stamped after boundary, the last heartbeat's time
        self.missed = 0.0  # the largest shortfall counted so far


class MissedEvents:
    """Counts in ``celery_exporter_events_missed_total`` the task-started events lost."""

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._workers: dict[str, _Worker] = {}
        self._throttle = Throttle()

    def started(self, hostname: str, timestamp: float) -> None:
        """A ``task-started`` from the worker: on the per-event path, so kept to a compare."""
        worker = self._workers.get(hostname)
        if worker is not None:
            if timestamp > worker.boundary:
                worker.after += 1
            elif timestamp > worker.base_time:
                worker.before += 1

    def heartbeat(self, hostname: str, timestamp: float, processed: float | None) -> None:
        """Judge the worker's previous heartbeat, then make this one the boundary."""
        if processed is None:
            return
        worker = self._workers.get(hostname)
        if worker is None or processed < worker.processed or timestamp < worker.boundary:
            # First sight, a restart (its count starts again) or a clock set back.
            self._workers[hostname] = _Worker(timestamp, processed)
            return
        seen = worker.before
        if seen or worker.after:  # a worker that sends no task events has -E off, loses none
            shortfall = worker.processed - worker.base_processed - seen
            if shortfall > worker.missed:
                limit = MAX_STARTS_PER_SECOND * max(1.0, timestamp - worker.boundary)
                added = min(shortfall - worker.missed, limit)
                worker.missed += added
                self._counter.inc((), added)
                self._log(hostname, added)
        worker.before = seen + worker.after
        worker.after = 0
        worker.boundary = timestamp
        worker.processed = processed

    def forget(self, hostname: str) -> None:
        """The worker was purged."""
        self._workers.pop(hostname, None)
        self._throttle.forget(hostname)

    def _log(self, hostname: str, added: float) -> None:
        if self._throttle.due(hostname):
            log.warning(
                "missed %d task-started events from %s: its heartbeat counts more tasks "
                "started than arrived (events lost on the way; see "
                "celery_exporter_events_missed_total, logged once a minute per worker)",
                added,
                hostname,
            )
