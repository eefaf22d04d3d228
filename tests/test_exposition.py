"""The direct text renderer writes exactly what prometheus_client would."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.telemetry.exposition import Registry
from exporter.telemetry.metrics import Metrics
from exporter.web.server import Status, serve


def _filled(static_labels: dict[str, str]) -> tuple[Registry, Metrics]:
    metrics = Metrics(static_labels=static_labels)
    registry = Registry()
    registry.register(metrics)
    for worker in ("celery@a", 'celery@"quoted"', "celery@back\\slash"):
        for name in ("tasks.add", "tasks.new\nline"):
            metrics.counter("celery_task_received_total").inc((name, worker, "celery"))
            metrics.counter("celery_task_failed_total").inc(
                (name, worker, "celery", "ValueError"), 3
            )
        metrics.gauge("celery_worker_up").set((worker,), 1)
        metrics.gauge("celery_worker_last_heartbeat_timestamp_seconds").set(
            (worker,), 1795500894.125
        )
        metrics.counter("celery_worker_tasks_processed_total").set_total((worker,), 12345678)
    for value in (0.0004, 0.3, 7.0, 5000.0):
        metrics.histogram("celery_task_runtime_seconds").observe(("tasks.add", "celery"), value)
    metrics.histogram("celery_exporter_event_lag_seconds").observe((), 0.02)
    metrics.gauge("celery_worker_tasks_active").set(("celery@nan",), float("nan"))
    metrics.gauge("celery_worker_tasks_prefetched").set(("celery@neg",), -5e7)
    metrics.counter("celery_exporter_broker_reconnects_total").inc()
    return registry, metrics


@pytest.mark.parametrize(
    "static_labels",
    [{}, {"cluster": 'eu"1', "zone": "b"}, {"aa": "x"}],
    ids=["none", "after-le", "before-le"],
)
def test_text_is_byte_identical_to_generate_latest(static_labels: dict[str, str]) -> None:
    registry, _ = _filled(static_labels)
    assert registry.text() == generate_latest(registry)


def test_series_gone_since_the_last_scrape_leave_the_text() -> None:
    registry, metrics = _filled({})
    registry.text()
    metrics.forget("hostname", "celery@a")
    text = registry.text()
    assert text == generate_latest(registry)
    assert b'hostname="celery@a"' not in text


def test_scrapes_negotiate_text_or_openmetrics() -> None:
    registry, _ = _filled({})
    status = Status(
        broker="redis://",
        connected=True,
        alive=True,
        last_error="",
        started_at=0.0,
        events_received=0,
        last_event_at=None,
        workers=(),
    )
    server = serve("127.0.0.1", 0, registry, lambda: status)
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    try:
        with urllib.request.urlopen(url) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert response.read() == generate_latest(registry)
        request = urllib.request.Request(
            url, headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        with urllib.request.urlopen(request) as response:
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            body = response.read().decode()
        assert body.endswith("# EOF\n")
        names = {
            family.name
            for family in text_string_to_metric_families(generate_latest(registry).decode())
        }
        assert "celery_task_received" in names
    finally:
        server.shutdown()
        server.server_close()
