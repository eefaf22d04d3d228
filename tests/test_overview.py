"""/api/v1/overview: what it computes, and what it shows of a real worker on Redis."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from exporter.telemetry.metrics import Metrics
from exporter.track.task import Task
from exporter.web.overview import (
    SAMPLES,
    TRACEBACK_BYTES,
    FailureRing,
    History,
    quantile,
    resident_memory,
)
from exporter.web.server import ASSETS, PAGE_HEADERS
from tests.celery_app import make_app
from tests.harness import InProcessExporter, parse, scrape
from tests.servers import RedisServer, wait_for
from tests.workers import WorkerFactory

BOUNDS = (0.1, 0.5, 1.0, 5.0)


def test_quantiles_interpolate_within_buckets_as_prometheus_does() -> None:
    # 10 under 0.1 s, 10 in 0.1-0.5 s, none up to 5 s, none past it.
    counts = [10, 10, 0, 0, 0]
    assert quantile(0.5, BOUNDS, counts) == pytest.approx(0.1)
    assert quantile(0.75, BOUNDS, counts) == pytest.approx(0.3)
    assert quantile(0.25, BOUNDS, counts) == pytest.approx(0.05)
    assert quantile(0.95, BOUNDS, [0, 0, 0, 0, 4]) == 5.0  # in +Inf: the highest bound
    assert quantile(0.5, BOUNDS, [0, 0, 0, 0, 0]) is None


def _failed(uuid: str, **fields: Any) -> dict[str, Any]:
    return {"type": "task-failed", "uuid": uuid, "hostname": "w@h", "timestamp": 1.0, **fields}


def test_the_failure_ring_is_bounded_and_keeps_no_arguments() -> None:
    ring = FailureRing(3)
    task = Task("app.charge", "celery")
    for index in range(5):
        ring.record(
            task,
            _failed(
                f"id-{index}",
                exception="ValueError('card declined')",
                traceback="x" * (TRACEBACK_BYTES * 3) + "\nValueError: card declined\n",
                args="['card-number-4111']",
                kwargs="{'secret': 1}",
                result="nothing",
            ),
        )
    failures = list(ring.failures)
    assert [failure["uuid"] for failure in failures] == ["id-2", "id-3", "id-4"]
    newest = failures[-1]
    assert set(newest) == {"time", "name", "uuid", "hostname", "exception", "message", "traceback"}
    assert (newest["name"], newest["exception"], newest["message"]) == (
        "app.charge",
        "ValueError",
        "'card declined'",
    )
    assert len(newest["traceback"].encode()) <= TRACEBACK_BYTES + 4
    assert newest["traceback"].endswith("ValueError: card declined\n")
    assert "card-number" not in json.dumps(failures)
    ring.record(task, _failed("odd", exception=None, traceback=["not", "text"]))
    assert (ring.failures[-1]["exception"], ring.failures[-1]["traceback"]) == ("unknown", "")


def test_the_history_keeps_15_minutes_of_10_second_intervals() -> None:
    metrics = Metrics()

    class Health:
        events_received = 0

    history = History(metrics, Health())  # type: ignore[arg-type]
    succeeded = metrics.counter("celery_task_succeeded_total")
    failed = metrics.counter("celery_task_failed_total")
    for second in range(0, 2000):
        if second % 2 == 0:
            succeeded.inc(("t", "w", "q"))
        if second % 10 == 0:
            failed.inc(("t", "w", "q", "E"))
        history.sample(1000.0 + second)
    view = history.view()
    assert len(history.samples) == SAMPLES
    assert len(view["time"]) == SAMPLES - 1 == 90
    assert view["time"][-1] == 1000.0 + 1990
    assert set(view["succeeded"]) == {5.0}
    assert set(view["failed"]) == {1.0}
    assert view["failure_ratio"] == pytest.approx(1 / 6)
    assert resident_memory() and resident_memory() > 1_000_000


def _get(url: str) -> tuple[dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return dict(response.headers), response.read()


def overview(url: str) -> dict[str, Any]:
    return json.loads(_get(url + "/api/v1/overview")[1])


def metric_sum(text: str, metric: str, /, **match: str) -> float:
    return sum(
        value
        for (sample, labels), value in parse(text).items()
        if sample == metric and match.items() <= dict(labels).items()
    )


def wait_finished(exporter: InProcessExporter, *, succeeded: int, failed: int) -> None:
    """Wait until exactly these many tasks succeeded and failed."""
    wait_for(
        lambda: (
            exporter.total("celery_task_succeeded_total") == succeeded
            and exporter.total("celery_task_failed_total") == failed
        ),
        timeout=30,
        message=lambda: f"not {succeeded} succeeded and {failed} failed",
    )


@pytest.fixture
def exporter(clean_redis: RedisServer) -> Iterator[InProcessExporter]:
    running = InProcessExporter(["--broker-url", clean_redis.url, "--recent-failures", "2"])
    wait_for(lambda: running.sample("celery_exporter_broker_connected") == 1, timeout=20)
    yield running
    running.stop()


def test_the_api_shows_what_a_real_worker_did(
    clean_redis: RedisServer, exporter: InProcessExporter, worker_factory: WorkerFactory
) -> None:
    worker = worker_factory(clean_redis.url, concurrency=1)  # tasks run in the order sent
    app = make_app(clean_redis.url)
    for index in range(4):
        app.send_task("tests.add", (index, 1))
    for index in range(3):
        app.send_task("tests.fail", (f"boom {index}",))
    wait_finished(exporter, succeeded=4, failed=3)
    data = overview(exporter.url)
    text = scrape(exporter.url)
    rows = {row["name"]: row for row in data["tasks"]}
    for name in ("tests.add", "tests.fail"):
        for state in ("started", "succeeded", "failed"):
            assert rows[name][state] == metric_sum(text, f"celery_task_{state}_total", name=name)
    assert (rows["tests.add"]["succeeded"], rows["tests.fail"]["failed"]) == (4, 3)
    assert 0 <= rows["tests.add"]["runtime_p50"] <= rows["tests.add"]["runtime_p95"] <= 1
    assert rows["tests.fail"]["runtime_p50"] is None  # run times are of succeeded tasks
    # The ring holds the last two of the three failures, newest first.
    recent = data["recent_failures"]
    assert (recent["enabled"], recent["capacity"]) == (True, 2)
    assert [f["message"] for f in recent["items"]] == ["'boom 2'", "'boom 1'"]
    assert {(f["exception"], f["name"], f["hostname"]) for f in recent["items"]} == {
        ("ValueError", "tests.fail", worker.hostname)
    }
    assert "ValueError: boom 2" in recent["items"][0]["traceback"]
    (shown,) = data["workers"]
    assert (shown["hostname"], shown["up"], shown["version"]) == (worker.hostname, True, "5.7.0")
    assert shown["processed"] == metric_sum(text, "celery_worker_tasks_processed_total")
    assert data["exporter"]["connected"] is True
    assert data["exporter"]["events_received"] >= 7 * 4  # sent, received, started, final
    assert data["exporter"]["diagnosis"] == ""
    assert data["exporter"]["memory_bytes"] > 1_000_000
    # The history fills at the receive loop's tick: a point every 10 s.
    wait_for(lambda: overview(exporter.url)["throughput"]["time"], timeout=15)


def test_the_page_its_assets_and_its_api_carry_a_strict_policy(
    exporter: InProcessExporter,
) -> None:
    for path in ("/", "/api/v1/overview", *ASSETS):
        headers, body = _get(exporter.url + path)
        assert body
        policy = headers["Content-Security-Policy"]
        assert policy == PAGE_HEADERS["Content-Security-Policy"]
        assert "default-src 'self'" in policy and "unsafe" not in policy
        assert headers["X-Content-Type-Options"] == "nosniff"
    assert _get(exporter.url + "/static/overview.js")[0]["Content-Type"].startswith(
        "text/javascript"
    )
    page = scrape(exporter.url, "/")
    assert "<script>" not in page and "<style" not in page and " style=" not in page


def test_zero_recent_failures_turns_the_list_off(clean_redis: RedisServer) -> None:
    running = InProcessExporter(
        ["--broker-url", clean_redis.url, "--recent-failures", "0", "--recent-tasks", "0"]
    )
    try:
        assert running.daemon.overview.failures is None
        handler = running.daemon.tracker._on_task["task-failed"]
        assert handler == running.daemon.tracker._on_failed  # nothing chained
        assert overview(running.url)["recent_failures"] == {
            "enabled": False,
            "capacity": 0,
            "items": [],
        }
    finally:
        running.stop()
