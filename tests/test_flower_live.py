"""``--flower-metrics`` against a real Flower on the same stream, on Redis and RabbitMQ.

Flower and the exporter read the events of one real prefork worker: both are
connected and have seen a heartbeat before the first task is sent, so they
see the same stream, and then every family Flower serves must be served by the
exporter with the same name, type and label names, and the same values.
"""

from __future__ import annotations

import math
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.celery_app import make_app
from tests.flower_process import Family, FlowerProcess, flower_families, without_created
from tests.harness import InProcessExporter, connected_exporter, scrape
from tests.servers import wait_for

SLEEP_SECONDS = 15
"""Long enough for heartbeats to report both pool slots busy."""
FINISHED = {"task-succeeded": 8, "task-failed": 3, "task-retried": 1, "task-rejected": 1}
"""5 adds (one with an ETA), 2 sleeps and the retried task succeed; 2 fails and the
rejected task fail, and the rejected one is rejected too."""


def _by_type(families: dict[str, Family]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for (_, labels), value in families.get("flower_events", ("", {}))[1].items():
        kind = dict(labels)["type"]
        totals[kind] = totals.get(kind, 0) + value
    return totals


def _value(families: dict[str, Family], family: str, **labels: str) -> float | None:
    samples = families.get(family, ("", {}))[1]
    return samples.get((family, frozenset(labels.items())))


def _label_names(family: Family) -> set[frozenset[str]]:
    return {frozenset(dict(labels).keys() - {"le"}) for _, labels in family[1]}


def _close(left: dict[Any, float], right: dict[Any, float]) -> bool:
    return left.keys() == right.keys() and all(
        math.isclose(left[key], right[key], rel_tol=1e-9, abs_tol=1e-9) for key in left
    )


@pytest.fixture
def flower_metrics_exporter(broker: Any) -> Any:
    running = connected_exporter(["--broker-url", broker.url, "--flower-metrics"], timeout=30)
    yield running
    running.stop()


def test_flower_and_the_exporter_serve_the_same_flower_families(
    broker: Any,
    flower_metrics_exporter: InProcessExporter,
    worker_factory: Callable[..., Any],
    tmp_path: Path,
) -> None:
    exporter = flower_metrics_exporter
    since = time.time()
    flower = FlowerProcess(broker.url, tmp_path).wait_serving()
    try:

        def both() -> tuple[dict[str, Family], dict[str, Family]]:
            return flower_families(flower.metrics_text()), flower_families(scrape(exporter.url))

        worker = worker_factory(broker.url, concurrency=2)
        host = worker.hostname
        wait_for(
            lambda: all(_value(side, "flower_worker_online", worker=host) == 1 for side in both()),
            timeout=60,
            interval=0.5,
            message=lambda: f"no heartbeat seen by both: {both()}",
        )
        app = make_app(broker.url)
        for _ in range(2):
            app.send_task("tests.sleep", (SLEEP_SECONDS,))
        executing = "flower_worker_number_of_currently_executing_tasks"
        wait_for(
            lambda: all(_value(side, executing, worker=host) == 2 for side in both()),
            timeout=SLEEP_SECONDS,
            interval=0.5,
            message=lambda: f"both slots never seen busy by both: {both()}",
        )
        for i in range(4):
            app.send_task("tests.add", (i, i))
        app.send_task("tests.add", (9, 9), countdown=1)
        for _ in range(2):
            app.send_task("tests.fail", ("boom",))
        app.send_task("tests.retry_then_succeed", (1,))
        app.send_task("tests.reject")

        def settled() -> bool:
            theirs, ours = both()
            return all(
                FINISHED.items() <= _by_type(side).items()
                and _value(side, executing, worker=host) == 0
                for side in (theirs, ours)
            ) and _by_type(theirs) == _by_type(ours)

        wait_for(settled, timeout=120, interval=0.5, message=lambda: f"flower, exporter: {both()}")
        theirs, ours = both()
        # What asks for OpenMetrics, as Datadog's check does, reads the same.
        request = urllib.request.Request(
            exporter.url + "/metrics", headers={"Accept": "application/openmetrics-text"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert flower_families(response.read().decode(), openmetrics=True) == ours
    finally:
        flower.stop()
    # Both began each series of a family during the test, at moments of their own.
    theirs, ours = (
        without_created(theirs, since, time.time()),
        without_created(ours, since, time.time()),
    )

    # The figures themselves: 11 tasks, the retried one published, received and started twice.
    by_type = _by_type(ours)
    assert by_type == {**FINISHED, "task-sent": 12, "task-received": 12,
                       "task-started": 12}  # fmt: skip
    runtime_count = sum(
        value
        for (name, _), value in ours["flower_task_runtime_seconds"][1].items()
        if name == "flower_task_runtime_seconds_count"
    )
    assert runtime_count == FINISHED["task-succeeded"]
    # Every family Flower serves, as Flower serves it.
    assert set(theirs) == {
        "flower_events", "flower_events_created", "flower_task_runtime_seconds",
        "flower_task_runtime_seconds_created", "flower_task_prefetch_time_seconds",
        "flower_worker_prefetched_tasks", "flower_worker_online", executing,
    }  # fmt: skip
    for name, family in theirs.items():
        assert name in ours, name
        assert ours[name][0] == family[0], name
        assert _label_names(ours[name]) == _label_names(family), name
    for name in ("flower_events", "flower_events_created", "flower_task_runtime_seconds_created",
                 "flower_worker_online", executing, "flower_worker_prefetched_tasks"):  # fmt: skip
        assert ours[name][1] == theirs[name][1], name
    histogram = "flower_task_runtime_seconds"
    assert {
        key: value for key, value in ours[histogram][1].items() if not key[0].endswith("_sum")
    } == {key: value for key, value in theirs[histogram][1].items() if not key[0].endswith("_sum")}
    assert _close(
        {k: v for k, v in ours[histogram][1].items() if k[0].endswith("_sum")},
        {k: v for k, v in theirs[histogram][1].items() if k[0].endswith("_sum")},
    )
    prefetch = "flower_task_prefetch_time_seconds"
    assert _close(ours[prefetch][1], theirs[prefetch][1])
