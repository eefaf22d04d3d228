"""Delivering spans to a collector that is busy, broken or slow, over real HTTP.

The collector is the suite's OTLP receiver, scripted to refuse, hang, answer
garbage or close mid-response before it accepts; spans come from the tracker
fed with hand-made events, through the daemon's own batch processor and sender.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceResponse,
)

from exporter.telemetry import tracing
from exporter.telemetry.metrics import Metrics
from exporter.telemetry.spans import MAX_STACKTRACE_LENGTH
from tests.events import event, received, sent, started, succeeded
from tests.servers import wait_for
from tests.test_tracing import OtlpReceiver, traced_tracker

Answer = Callable[[BaseHTTPRequestHandler], None]


def refuse(status: int, retry_after: str | None = None) -> Answer:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        if retry_after is not None:
            handler.send_header("Retry-After", retry_after)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return answer


def garbage(handler: BaseHTTPRequestHandler) -> None:
    handler.wfile.write(b"\x00\xffthis is not HTTP\r\n\r\n")
    handler.close_connection = True


def cut_short(handler: BaseHTTPRequestHandler) -> None:
    handler.wfile.write(b"HTTP/1.1 50")
    handler.close_connection = True


def hang_up(handler: BaseHTTPRequestHandler) -> None:
    handler.close_connection = True


@pytest.fixture
def collector() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.stop()


class Scene:
    """A tracker whose spans go to ``collector`` through the daemon's exporter."""

    def __init__(self, collector: OtlpReceiver, **environ: str) -> None:
        self.metrics = Metrics()
        self.spans = tracing.build(
            self.metrics,
            1.0,
            {**os.environ, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": collector.endpoint, **environ},
        )
        self.tracker = traced_tracker(self.metrics, self.spans, max_tracked_tasks=100_000)

    def run_tasks(self, count: int) -> None:
        """``count`` tasks, sent to succeeded: two spans each."""
        for n in range(count):
            task, at = str(uuid.uuid4()), 1000.0 + n
            for item in (
                sent(task, "app.add", "celery", at),
                received(task, "app.add", at + 0.1),
                started(task, at + 0.2),
                succeeded(task, at + 0.3, runtime=0.1),
            ):
                self.tracker.handle(item, item["timestamp"])

    def counts(self) -> dict[str, float]:
        values = self.metrics.counter("celery_exporter_spans_total").values
        return {labels[0]: value for labels, value in values.items()}


@pytest.fixture(autouse=True)
def quick_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "300")  # one batch for a few tasks


def _delivered(collector: OtlpReceiver, count: int) -> None:
    wait_for(lambda: len(collector.spans) >= count, timeout=20, message="spans missing")


@pytest.mark.parametrize(
    ("answers", "least_seconds"),
    [
        ([refuse(503)] * 3, 0.25 + 0.5 + 1.0),  # backoff with jitter: at least half of each
        ([refuse(503, "1"), refuse(429, "0"), refuse(502), refuse(504)], 1.0),
        ([garbage, cut_short, hang_up], 0.25 + 0.5 + 1.0),
    ],
    ids=["503-thrice", "retry-after", "garbage-cut-short-hang-up"],
)
def test_a_busy_or_broken_collector_loses_no_span(
    collector: OtlpReceiver, answers: list[Answer], least_seconds: float
) -> None:
    scene = Scene(collector)
    collector.answers.extend(answers)
    began = time.monotonic()
    scene.run_tasks(5)
    _delivered(collector, 10)
    took = time.monotonic() - began
    scene.spans.close()
    assert collector.answered == len(answers)
    assert len(collector.spans) == 10
    assert len({span.span_id for span in collector.spans}) == 10
    assert scene.counts() == {"exported": 10, "dropped": 0, "retried": 10 * len(answers)}
    assert least_seconds <= took < 10


def test_a_refused_batch_is_dropped_counted_and_logged_once(
    collector: OtlpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    scene = Scene(collector)
    collector.answers.extend([refuse(400), refuse(400)])
    with caplog.at_level(logging.WARNING, logger="exporter.telemetry.delivery"):
        scene.run_tasks(3)
        wait_for(lambda: collector.answered == 1, timeout=10, message="no request")
        wait_for(lambda: scene.counts()["dropped"] == 6, timeout=10, message="not counted")
        scene.run_tasks(3)
        wait_for(lambda: scene.counts()["dropped"] == 12, timeout=10, message="not counted")
    scene.spans.close()
    assert scene.counts() == {"exported": 0, "dropped": 12, "retried": 0}
    (record,) = caplog.records  # the second failure, within the minute, is not logged
    assert "could not export 6 spans" in record.getMessage()
    assert "HTTP 400" in record.getMessage()


def test_a_partial_success_counts_the_rejected_spans_as_dropped(
    collector: OtlpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    collector.reply = ExportTraceServiceResponse(
        partial_success=ExportTracePartialSuccess(rejected_spans=1, error_message="too old")
    )
    scene = Scene(collector)
    with caplog.at_level(logging.WARNING, logger="exporter.telemetry.delivery"):
        scene.run_tasks(2)
        _delivered(collector, 4)
        scene.spans.close()
    assert scene.counts() == {"exported": 3, "dropped": 1, "retried": 0}
    assert "the collector rejected 1 of 4 spans: too old" in caplog.text


def test_a_hanging_collector_blocks_neither_events_nor_memory(
    collector: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "64")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "16")
    release = threading.Event()

    def hang(handler: BaseHTTPRequestHandler) -> None:
        release.wait(30)
        handler.close_connection = True

    collector.answers.extend([hang] * 100)
    scene = Scene(collector, OTEL_EXPORTER_OTLP_TRACES_TIMEOUT="300")
    began = time.monotonic()
    scene.run_tasks(2000)  # 8,000 events, 4,000 spans
    took = time.monotonic() - began
    assert scene.spans.processor.queued() <= 64
    assert took < 5, f"the events waited on the collector: {took:.1f}s"
    wait_for(lambda: collector.answered >= 2, timeout=10, message="no second try")
    began = time.monotonic()
    scene.spans.close()  # stopping: no more retries, a try each for what is queued
    assert time.monotonic() - began < 30
    release.set()
    counts = scene.counts()
    assert counts["exported"] + counts["dropped"] == 4000
    assert counts["dropped"] >= 4000 - 64 - 16


def test_stopping_does_not_wait_out_a_retry_after(collector: OtlpReceiver) -> None:
    collector.answers.extend([refuse(503, "8")] * 10)
    scene = Scene(collector)
    scene.run_tasks(2)
    wait_for(lambda: collector.answered == 1, timeout=10, message="no request")
    began = time.monotonic()
    scene.spans.close()
    assert time.monotonic() - began < 2
    assert scene.counts() == {"exported": 0, "dropped": 4, "retried": 0}


def test_binary_junk_huge_tracebacks_and_control_characters_are_cut_or_replaced(
    collector: OtlpReceiver,
) -> None:
    scene = Scene(collector)
    task, other = str(uuid.uuid4()), str(uuid.uuid4())
    name = "app.\x00odd\x1b[31m\ud800name"
    traceback = "Traceback (most recent call last):\n" + "  frame\n" * 1_000_000 + "ValueError: x"
    for item in (
        sent(task, name, "celery\udcff", 1.0),
        started(task, 2.0),
        event(
            "task-failed",
            3.0,
            uuid=task,
            exception="ValueError('\udc80\x00\xff binary')",
            traceback=traceback,
        ),
        sent(other, "app.add", "celery", 4.0),
        started(other, 5.0),
        succeeded(other, 6.0, runtime=1.0),
    ):
        scene.tracker.handle(item, item["timestamp"])
    _delivered(collector, 4)
    scene.spans.close()
    assert scene.counts()["exported"] == 4  # the junk failed no batch
    spans = {(span.name, span.kind): span for span in collector.spans}
    failure = spans[("process app.\x00odd\x1b[31m?name", 5)]
    assert failure.attributes["messaging.destination.name"] == "celery?"
    assert failure.status == (2, "?\x00\xff binary")
    assert failure.attributes["error.type"] == "ValueError"
    ((_, _, exception),) = failure.events
    stack = exception["exception.stacktrace"]
    assert len(stack) == MAX_STACKTRACE_LENGTH
    assert stack.startswith("Traceback (most recent call last):")
    assert stack.endswith("ValueError: x")
    assert ("process app.add", 5) in spans
