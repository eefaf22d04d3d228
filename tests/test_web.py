"""The HTTP endpoint as a user and a prober see it, with no broker reachable."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from exporter.web.server import Status, WorkerStatus, diagnosis, landing_page
from tests.harness import InProcessExporter, scrape


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def exporter_without_broker() -> Iterator[InProcessExporter]:
    url = f"redis://:s3cret@127.0.0.1:{_closed_port()}/0"
    exporter = InProcessExporter(["--broker-url", url])
    yield exporter
    exporter.stop()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_probes_and_metrics_without_a_broker(exporter_without_broker: InProcessExporter) -> None:
    url = exporter_without_broker.url
    assert _status(url + "/healthz") == 200
    assert _status(url + "/readyz") == 503
    assert _status(url + "/nowhere") == 404
    text = scrape(url)
    assert "celery_exporter_broker_connected 0.0" in text
    assert 'celery_exporter_build_info{version="0.1.0"} 1.0' in text
    assert 'celery_exporter_events_invalid_total{reason="malformed"} 0.0' in text


def test_the_landing_page_masks_the_password(exporter_without_broker: InProcessExporter) -> None:
    page = scrape(exporter_without_broker.url, "/")
    assert "s3cret" not in page
    assert "redis://:****@127.0.0.1" in page
    assert 'href="/metrics"' in page
    assert "Not connected to the broker" in page


def test_metrics_come_gzipped_when_asked(exporter_without_broker: InProcessExporter) -> None:
    request = urllib.request.Request(
        exporter_without_broker.url + "/metrics", headers={"Accept-Encoding": "gzip"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["Content-Encoding"] == "gzip"


def _status_at(connected: bool, last_event_at: float | None) -> Status:
    return Status(
        broker="redis://r/0",
        connected=connected,
        alive=True,
        last_error="",
        started_at=1000.0,
        events_received=0,
        last_event_at=last_event_at,
        workers=(WorkerStatus("celery@w1", True, 1990.0, "5.7.0"),),
    )


def test_a_quiet_stream_is_diagnosed() -> None:
    assert diagnosis(_status_at(True, 1990.0), now=2000.0) == ""
    assert "started with -E" in diagnosis(_status_at(True, 1900.0), now=2000.0)
    assert "started with -E" in diagnosis(_status_at(True, None), now=2000.0)
    assert '<p id="problem" class="problem" hidden></p>' in landing_page(
        _status_at(True, 1990.0), now=2000.0
    )
    page = landing_page(_status_at(True, 1900.0), now=2000.0)
    assert '<p id="problem" class="problem">Connected, but no events for a minute.' in page
