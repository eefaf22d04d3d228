"""Worker liveness from heartbeats, judged by arrival time.

Worker clocks may be skewed, so only the daemon's own clock decides whether
a heartbeat is late: a worker is up while its last heartbeat arrived less
than ``timeout`` seconds ago and it has not said goodbye.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..telemetry.metrics import Metrics


@dataclass
class Worker:
    """What the landing page and the liveness check need about one worker."""

    hostname: str
    last_seen: float
    up: bool = True
    said_goodbye: bool = False
    info: tuple[str, str, str] = ("", "", "")
    pid: int | None = None
    processed: int = 0


class WorkerTracker:
    """Sets the worker gauges from heartbeats and expires silent workers."""

    def __init__(self, metrics: Metrics, *, timeout: float, purge_after: float) -> None:
        self.timeout = timeout
        self.purge_after = purge_after
        self.workers: dict[str, Worker] = {}
        self._up = metrics.gauge("celery_worker_up")
        self._last = metrics.gauge("celery_worker_last_heartbeat_timestamp_seconds")
        self._active = metrics.gauge("celery_worker_tasks_active")
        self._processed = metrics.counter("celery_worker_tasks_processed_total")
        self._info = metrics.gauge("celery_worker_info")

    def heartbeat(self, hostname: str, event: dict[str, Any], arrival: float) -> None:
        """A ``worker-online`` or ``worker-heartbeat``: the worker is alive."""
        key = (hostname,)
        worker = self.workers.get(hostname)
        if worker is None:
            worker = self.workers[hostname] = Worker(hostname, arrival)
        worker.last_seen = arrival
        worker.up = True
        worker.said_goodbye = False
        self._up.set(key, 1)
        self._last.set(key, arrival)
        self._active.set(key, event.get("active") or 0)
        processed = event.get("processed") or 0
        self._processed.set_total(key, processed)
        pid = event.get("pid")
        worker.pid = pid if type(pid) is int else None
        worker.processed = processed if type(processed) is int else 0
        info = (_text(event.get("sw_ident")), _text(event.get("sw_ver")),
                _text(event.get("sw_sys")))  # fmt: skip
        if info != worker.info:
            self._info.remove(key + worker.info)
            worker.info = info
            self._info.set(key + info, 1)

    def restarted(self, hostname: str, event: dict[str, Any]) -> bool:
        """Whether the worker's event comes from another process than its last heartbeat's:
        another pid, or a count of processed tasks that started again."""
        worker = self.workers.get(hostname)
        if worker is None or worker.pid is None:
            return False
        pid, processed = event.get("pid"), event.get("processed")
        return (type(pid) is int and pid != worker.pid) or (
            type(processed) is int and processed < worker.processed
        )

    def offline(self, hostname: str, arrival: float) -> None:
        """A ``worker-offline``: the worker shut down cleanly."""
        worker = self.workers.get(hostname)
        if worker is None:
            worker = self.workers[hostname] = Worker(hostname, arrival)
        worker.up = False
        worker.said_goodbye = True
        self._up.set((hostname,), 0)

    def expire(self, now: float) -> tuple[list[str], list[str]]:
        """Mark silent workers down; return those just lost, and those to forget.

        A worker that went silent stays down for ``purge_after`` (a day by
        default) so its alert holds until it returns; one that said goodbye
        (``worker-offline``) is forgotten after ``timeout``, so a deploy does
        not look like an outage, and its pod-named series do not pile up.
        """
        lost, purged = [], []
        for worker in list(self.workers.values()):
            silence = now - worker.last_seen
            if silence > (self.timeout if worker.said_goodbye else self.purge_after):
                del self.workers[worker.hostname]
                purged.append(worker.hostname)
            elif worker.up and silence > self.timeout:
                worker.up = False
                self._up.set((worker.hostname,), 0)
                lost.append(worker.hostname)
        return lost, purged


def _text(value: Any) -> str:
    return value[:100] if isinstance(value, str) else ""
