"""Event dicts shaped like the ones Celery publishes, and a tracker to feed them to."""

from __future__ import annotations

import itertools
from typing import Any

from prometheus_client import CollectorRegistry

from exporter.telemetry.metrics import Metrics
from exporter.track.tracker import Tracker

_clock = itertools.count(1)


def event(kind: str, timestamp: float, hostname: str = "celery@w1", **fields: Any) -> dict:
    return {
        "type": kind,
        "timestamp": timestamp,
        "hostname": hostname,
        "pid": 100,
        "clock": next(_clock),
        "utcoffset": 0,
        **fields,
    }


def sent(uuid: str, name: str, queue: str | None, timestamp: float, **fields: Any) -> dict:
    return event(
        "task-sent",
        timestamp,
        hostname="gen1@client",
        **{
            "uuid": uuid,
            "name": name,
            "queue": queue,
            "args": "()",
            "kwargs": "{}",
            "retries": 0,
            "eta": None,
            "expires": None,
            "root_id": uuid,
            "parent_id": None,
            **fields,
        },
    )


def received(
    uuid: str, name: str, timestamp: float, hostname: str = "celery@w1", **fields: Any
) -> dict:
    return event(
        "task-received",
        timestamp,
        hostname,
        **{
            "uuid": uuid,
            "name": name,
            "args": "()",
            "kwargs": "{}",
            "retries": 0,
            "eta": None,
            "expires": None,
            "root_id": uuid,
            "parent_id": None,
            **fields,
        },
    )


def started(uuid: str, timestamp: float, hostname: str = "celery@w1") -> dict:
    return event("task-started", timestamp, hostname, uuid=uuid)


def succeeded(uuid: str, timestamp: float, runtime: float, hostname: str = "celery@w1") -> dict:
    return event("task-succeeded", timestamp, hostname, uuid=uuid, result="3", runtime=runtime)


def failed(
    uuid: str,
    timestamp: float,
    exception: str,
    hostname: str = "celery@w1",
    traceback: str = "Traceback ...",
) -> dict:
    return event(
        "task-failed",
        timestamp,
        hostname,
        uuid=uuid,
        exception=exception,
        traceback=traceback,
    )


def heartbeat(
    hostname: str,
    timestamp: float,
    active: int = 0,
    processed: int = 0,
    kind: str = "worker-heartbeat",
    pid: int = 100,
) -> dict:
    return event(
        kind,
        timestamp,
        hostname,
        pid=pid,
        freq=2.0,
        sw_ident="py-celery",
        sw_ver="5.7.0",
        sw_sys="Linux",
        active=active,
        processed=processed,
        loadavg=[0.1, 0.1, 0.1],
    )


class Scene:
    """A tracker with its registry, and shorthand to read samples."""

    def __init__(self, **options: Any) -> None:
        settings = {
            "max_tracked_tasks": 1000,
            "default_queue": "celery",
            "worker_timeout": 30.0,
            "purge_offline_after": 600.0,
            "max_label_values": 1000,
            **options,
        }
        self.metrics = Metrics()
        self.registry = CollectorRegistry()
        self.registry.register(self.metrics)
        self.tracker = Tracker(self.metrics, **settings)

    def feed(self, *events: dict, arrival: float = 1000.0) -> None:
        for one in events:
            self.tracker.handle(one, arrival)

    def value(self, metric: str, /, **labels: str) -> float | None:
        return self.registry.get_sample_value(metric, labels)
