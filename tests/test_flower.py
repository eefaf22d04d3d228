"""``--flower-metrics``: the same events given to Flower's own state and to the tracker
give the same ``flower_*`` series; off, nothing of it is served or chained.

Flower's ``EventsState`` (the class its event thread feeds) runs in this process
with the global prometheus_client registry it writes to; each test starts it afresh.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from flower import events as flower_events
from prometheus_client import REGISTRY, generate_latest

from exporter import config
from exporter.daemon import Daemon
from exporter.telemetry.exposition import TextWriter
from exporter.telemetry.flower import FlowerMetrics
from exporter.telemetry.metrics import Metrics
from exporter.track.tracker import Tracker
from tests.events import event, failed, heartbeat, received, sent, started, succeeded
from tests.flower_process import Family, flower_families, without_created

ARRIVAL = 1000.0
W1, W2 = "celery@w1", "celery@w2"


def retried(uuid: str, timestamp: float, hostname: str = W1) -> dict:
    return event("task-retried", timestamp, hostname, uuid=uuid, exception="RuntimeError('x')")


@pytest.fixture
def flower_state() -> Iterator[Any]:
    """A fresh ``flower.events.EventsState``, its metrics unregistered afterwards."""
    flower_events.PROMETHEUS_METRICS = None
    state = flower_events.EventsState()
    yield state
    prometheus = flower_events.get_prometheus_metrics()
    for collector in vars(prometheus).values():
        REGISTRY.unregister(collector)
    flower_events.PROMETHEUS_METRICS = None


def _tracker(max_label_values: int = 1000) -> tuple[Tracker, Metrics]:
    metrics = Metrics(flower_metrics=True)
    tracker = Tracker(
        metrics,
        max_tracked_tasks=1000,
        default_queue="celery",
        worker_timeout=30.0,
        purge_offline_after=600.0,
        max_label_values=max_label_values,
        flower=FlowerMetrics(metrics, 1000),
    )
    return tracker, metrics


def _both(flower_state: Any, *events: dict) -> tuple[dict[str, Family], dict[str, Family]]:
    """Flower's series and the tracker's, after the same events (when each series began
    checked to be during the call)."""
    tracker, metrics = _tracker()
    since = time.time()
    for one in events:
        flower_state.event({**one, "local_received": one["timestamp"]})
        tracker.handle(dict(one), ARRIVAL)
    tracker.tick(ARRIVAL + 3.0)  # releases events held for a name
    theirs = flower_families(generate_latest(REGISTRY).decode())
    ours = flower_families(TextWriter(metrics).text().decode())
    until = time.time()
    return without_created(theirs, since, until), without_created(ours, since, until)


LIFECYCLES = (
    heartbeat(W1, 1.0, kind="worker-online"),
    heartbeat(W2, 1.0, active=0),
    sent("a", "app.add", "celery", 10.0),
    received("a", "app.add", 10.5),
    started("a", 11.0),
    succeeded("a", 12.0, runtime=0.9),
    sent("b", "app.fail", "celery", 10.0),
    received("b", "app.fail", 10.5, hostname=W2),
    started("b", 11.75, hostname=W2),
    failed("b", 12.0, "ValueError('x')", hostname=W2),
    # An ETA task: no prefetch figures in Flower.
    sent("c", "app.later", "celery", 10.0, eta="2030-01-01T00:00:00"),
    received("c", "app.later", 10.5, eta="2030-01-01T00:00:00"),
    started("c", 11.5),
    succeeded("c", 12.0, runtime=7.5),
    # Revoked while prefetched, and one still prefetched.
    received("d", "app.add", 10.5),
    event("task-revoked", 12.0, uuid="d"),
    received("e", "app.add", 13.0),
    # A retry reported after the next delivery was received, as prefork workers may.
    sent("r", "app.retry", "celery", 10.0),
    received("r", "app.retry", 10.5),
    started("r", 11.0),
    received("r", "app.retry", 12.0),
    retried("r", 11.5),
    started("r", 12.25),
    succeeded("r", 12.5, runtime=0.2),
    heartbeat(W1, 13.0, active=3),
    heartbeat(W2, 14.0, kind="worker-offline"),
)


def test_the_same_events_give_flowers_series(flower_state: Any) -> None:
    theirs, ours = _both(flower_state, *LIFECYCLES)
    assert ours == theirs
    events = ours["flower_events"][1]
    assert events[("flower_events_total", frozenset(
        {"worker": W1, "type": "task-received", "task": "app.retry"}.items()))] == 2  # fmt: skip
    prefetched = ours["flower_worker_prefetched_tasks"][1]
    assert prefetched[("flower_worker_prefetched_tasks", frozenset(
        {"worker": W1, "task": "app.add"}.items()))] == 1  # fmt: skip
    prefetch_time = ours["flower_task_prefetch_time_seconds"][1]
    assert prefetch_time[("flower_task_prefetch_time_seconds", frozenset(
        {"worker": W2, "task": "app.fail"}.items()))] == 0  # fmt: skip
    online = ours["flower_worker_online"][1]
    assert online == {
        ("flower_worker_online", frozenset({"worker": W1}.items())): 1,
        ("flower_worker_online", frozenset({"worker": W2}.items())): 0,
    }


def test_a_running_task_shows_its_prefetch_time(flower_state: Any) -> None:
    theirs, ours = _both(
        flower_state,
        received("a", "app.add", 10.5),
        started("a", 11.75),
        heartbeat(W1, 12.0, active=1),
    )
    assert ours == theirs
    key = frozenset({"worker": W1, "task": "app.add"}.items())
    assert (
        ours["flower_task_prefetch_time_seconds"][1][("flower_task_prefetch_time_seconds", key)]
        == 1.25
    )
    assert ours["flower_worker_number_of_currently_executing_tasks"][1] == {
        ("flower_worker_number_of_currently_executing_tasks", frozenset({"worker": W1}.items())): 1
    }


def test_task_names_and_workers_are_bounded_and_purged_workers_go() -> None:
    tracker, metrics = _tracker(max_label_values=2)
    for index, host in enumerate(("celery@a", "celery@b", "celery@c")):
        tracker.handle(heartbeat(host, 1.0), ARRIVAL)
        tracker.handle(received(f"t{index}", f"app.t{index}", 1.0, hostname=host), ARRIVAL)
    # The client's hostname has a slot of its own, never a worker's.
    tracker.handle(sent("s", "app.t0", "celery", 1.0), ARRIVAL)
    events = metrics.counter("flower_events_total").values
    assert events == {
        ("celery@a", "task-received", "app.t0"): 1,
        ("celery@b", "task-received", "app.t1"): 1,
        ("other", "task-received", "other"): 1,
        ("gen1@client", "task-sent", "app.t0"): 1,
    }
    tracker.handle(heartbeat("celery@a", 2.0, kind="worker-offline"), ARRIVAL)
    tracker.tick(ARRIVAL + 31.0)  # gone after --worker-timeout, having said goodbye
    for name in ("flower_events_total", "flower_worker_online", "flower_worker_prefetched_tasks"):
        assert all("celery@a" not in key for key in metrics.families[name].values), name
    assert metrics.gauge("flower_worker_online").values == {("celery@b",): 1, ("other",): 1}


def test_off_serves_no_flower_family_and_chains_nothing() -> None:
    argv = [
        "--broker-url",
        "redis://localhost:1/0",
        "--recent-failures",
        "0",
        "--recent-tasks",
        "0",
    ]
    off = Daemon.build(config.load(argv, environ={}))
    assert not [name for name in off.metrics.families if name.startswith("flower_")]
    assert b"flower_" not in TextWriter(off.metrics).text()
    assert off.tracker.flower is None
    # Every handler is the tracker's own method (failures are not listed): nothing wraps it.
    assert all(hasattr(handler, "__self__") for handler in off.tracker._on_task.values())
    assert all(hasattr(handler, "__self__") for handler in off.tracker._on_worker.values())
    on = Daemon.build(
        config.load(
            ["--broker-url", "redis://localhost:1/0"], {"CELERY_EXPORTER_FLOWER_METRICS": "1"}
        )
    )
    assert {name for name in on.metrics.families if name.startswith("flower_")} == {
        "flower_events_total", "flower_events_created", "flower_task_runtime_seconds",
        "flower_task_runtime_seconds_created", "flower_task_prefetch_time_seconds",
        "flower_worker_prefetched_tasks", "flower_worker_online",
        "flower_worker_number_of_currently_executing_tasks",
    }  # fmt: skip


def test_a_bad_value_names_the_key() -> None:
    with pytest.raises(config.ConfigError) as error:
        config.load(["--broker-url", "redis://r/0"], {"CELERY_EXPORTER_FLOWER_METRICS": "maybe"})
    assert str(error.value) == (
        "flower_metrics: expected true or false, got 'maybe' (from CELERY_EXPORTER_FLOWER_METRICS)"
    )
