"""Traces from the event stream: real OTLP/HTTP requests from real workflows.

An OTLP receiver in the test process decodes what the exporter posts with
the OTLP protobuf classes; Celery workers run chains, groups and failures
on a real Redis server. Hand-made events cover what a worker cannot be
made to do on demand (eviction, sampling of many workflows).
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from celery import chain, group
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from exporter import otlp, tracing
from exporter.metrics import Metrics
from exporter.tracker import Tracker
from tests.celery_app import make_app
from tests.events import event, failed, received, sent, started, succeeded
from tests.harness import ROOT, ExporterProcess
from tests.otlp_endpoint import OtlpEndpoint
from tests.servers import wait_for

CONSUMER = 5  # SpanKind.SPAN_KIND_CONSUMER in OTLP
ERROR = 2  # StatusCode.STATUS_CODE_ERROR


@dataclass(frozen=True)
class Span:
    """One received span, with ids as hex and values as Python values."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    start: int
    end: int
    attributes: dict[str, Any]
    events: tuple[tuple[str, int, dict[str, Any]], ...]
    status: tuple[int, str]
    resource: dict[str, Any]

    def event_times(self, name: str) -> list[int]:
        return [time for event_name, time, _ in self.events if event_name == name]


def _value(value: AnyValue) -> Any:
    return getattr(value, value.WhichOneof("value"))


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


class OtlpReceiver(OtlpEndpoint):
    """The test collector: keeps every span it receives, in order."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        super().__init__()

    def received(self, request: ExportTraceServiceRequest, size: int) -> None:
        self.spans.extend(_spans(request))

    def by_id(self) -> dict[str, Span]:
        """Spans by the task uuid they describe."""
        return {span.attributes["messaging.message.id"]: span for span in list(self.spans)}


def _spans(request: ExportTraceServiceRequest) -> Iterator[Span]:
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield Span(
                    name=span.name,
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_id=span.parent_span_id.hex(),
                    kind=span.kind,
                    start=span.start_time_unix_nano,
                    end=span.end_time_unix_nano,
                    attributes=_attributes(span.attributes),
                    events=tuple(
                        (e.name, e.time_unix_nano, _attributes(e.attributes)) for e in span.events
                    ),
                    status=(span.status.code, span.status.message),
                    resource=resource,
                )


@pytest.fixture
def collector() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.stop()


def _traced_exporter(broker_url: str, receiver: OtlpReceiver, *argv: str) -> ExporterProcess:
    process = ExporterProcess(
        ["--broker-url", broker_url, "--otlp-traces", *argv],
        env={
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_SERVICE_NAME": "billing",
        },
    )
    process.wait_serving()
    wait_for(
        lambda: process.sample("celery_exporter_broker_connected") == 1,
        timeout=20,
        message=f"exporter never connected:\n{process.log()}",
    )
    return process


def _ids(count: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(count)]


def _hex(task_id: str) -> str:
    return uuid.UUID(task_id).hex


def test_workflows_become_trees_of_spans(
    clean_redis: Any, collector: OtlpReceiver, worker_factory: Callable[..., Any]
) -> None:
    unsampled = OtlpReceiver()
    traced = _traced_exporter(clean_redis.url, collector)
    dropped = _traced_exporter(clean_redis.url, unsampled, "--trace-sample-ratio", "0")
    try:
        worker = worker_factory(clean_redis.url)
        wait_for(
            lambda: (
                traced.sample("celery_worker_up", {"hostname": worker.hostname}) == 1
                and dropped.sample("celery_worker_up", {"hostname": worker.hostname}) == 1
            ),
            timeout=30,
            message="no heartbeat from the worker",
        )
        app = make_app(clean_redis.url)
        first, second = _ids(2)
        chain(
            app.signature("tests.add", (1, 2)).set(task_id=first),
            app.signature("tests.add", (3,)).set(task_id=second),
        ).apply_async()
        head, left, right = _ids(3)
        chain(
            app.signature("tests.add", (1, 1)).set(task_id=head),
            group(
                app.signature("tests.add", (10,)).set(task_id=left),
                app.signature("tests.add", (20,)).set(task_id=right),
            ),
        ).apply_async()
        failing = str(uuid.uuid4())
        app.send_task("tests.fail", ("boom",), task_id=failing)
        everything = {first, second, head, left, right, failing}
        wait_for(
            lambda: everything <= collector.by_id().keys(),
            timeout=60,
            message=f"spans missing: {everything - collector.by_id().keys()}",
        )
        assert traced.stop() == 0
        assert dropped.stop() == 0  # stopping flushes: anything sampled would be sent by now
    finally:
        traced.stop()
        dropped.stop()
        unsampled.stop()
    assert unsampled.spans == []
    assert unsampled.requests == 0

    spans = collector.by_id()
    assert len(collector.spans) == len(spans) == 6  # one span per task, each exported once

    # The chain: one trace, named by the root task's uuid; the second task under the first.
    assert spans[first].trace_id == spans[second].trace_id == _hex(first)
    assert spans[first].parent_id == ""
    assert spans[second].parent_id == spans[first].span_id
    # The group applied by the chain: both members are children of the head task.
    assert {spans[task].trace_id for task in (head, left, right)} == {_hex(head)}
    assert spans[head].parent_id == ""
    assert spans[left].parent_id == spans[right].parent_id == spans[head].span_id
    assert len({span.span_id for span in spans.values()}) == 6
    assert spans[failing].trace_id == _hex(failing)

    for task_id in everything - {failing}:
        span = spans[task_id]
        assert span.name == "tests.add"
        assert span.kind == CONSUMER
        assert span.status == (0, "")
        assert span.attributes["messaging.system"] == "celery"
        assert span.attributes["messaging.operation.type"] == "process"
        assert span.attributes["messaging.destination.name"] == "celery"
        assert span.attributes["celery.task.name"] == "tests.add"
        assert span.attributes["celery.worker.hostname"] == worker.hostname
        assert span.attributes["celery.retries"] == 0
        assert span.attributes["celery.state"] == "SUCCESS"
        assert [name for name, _, _ in span.events] == ["received", "started"]
        (received_at,), (started_at,) = span.event_times("received"), span.event_times("started")
        assert span.start <= received_at <= started_at <= span.end
        assert span.attributes["celery.queue_wait_seconds"] == (started_at - span.start) / 1e9
        assert span.attributes["celery.run_seconds"] == (span.end - started_at) / 1e9
        assert span.resource["service.name"] == "billing"

    failure = spans[failing]
    assert failure.name == "tests.fail"
    assert failure.status == (ERROR, "ValueError: boom")
    assert failure.attributes["celery.state"] == "FAILURE"
    assert [name for name, _, _ in failure.events] == ["received", "started", "exception"]
    exception = failure.events[-1][2]
    assert exception["exception.type"] == "ValueError"
    assert exception["exception.message"] == "boom"
    assert "ValueError: boom" in exception["exception.stacktrace"]
    assert failure.start <= failure.events[0][1] <= failure.events[1][1] <= failure.end


def _scene(
    max_tracked_tasks: int = 100, ratio: float = 1.0
) -> tuple[Tracker, InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    exporter = tracing.ReadableSpanExporter(memory, *tracing.origin())
    spans = tracing.Spans(SimpleSpanProcessor(exporter), ratio)
    tracker = Tracker(
        Metrics(),
        max_tracked_tasks=max_tracked_tasks,
        default_queue="celery",
        worker_timeout=30,
        purge_offline_after=600,
        max_label_values=100,
        spans=spans,
    )
    return tracker, memory


def _feed(tracker: Tracker, *events: dict) -> None:
    for item in events:
        tracker.handle(item, item["timestamp"])


def test_a_task_evicted_unfinished_ends_incomplete() -> None:
    tracker, memory = _scene(max_tracked_tasks=2)
    a, b, c = _ids(3)
    _feed(
        tracker,
        sent(a, "app.slow", "batch", 100.0),
        received(a, "app.slow", 100.5),
        started(a, 101.0),
        sent(b, "app.add", "celery", 102.0),
    )
    assert memory.get_finished_spans() == ()
    _feed(tracker, sent(c, "app.add", "celery", 103.0))  # the table is full: a goes

    (span,) = memory.get_finished_spans()
    assert span.name == "app.slow"
    assert span.attributes["celery.incomplete"] is True
    assert "celery.state" not in span.attributes
    assert span.status.is_unset
    assert (span.start_time, span.end_time) == (100_000_000_000, 101_000_000_000)
    assert [event.name for event in span.events] == ["received", "started"]
    _feed(tracker, succeeded(a, 104.0, runtime=3.0))  # too late: no second span
    assert len(memory.get_finished_spans()) == 1


def test_retries_are_events_of_one_span_without_sent_events() -> None:
    tracker, memory = _scene()
    task, parent = _ids(2)
    lineage = {"root_id": parent, "parent_id": parent}
    _feed(
        tracker,
        received(task, "app.flaky", 10.0, **lineage),
        started(task, 10.5),
        event("task-retried", 11.0, uuid=task, exception="RuntimeError('later')"),
        received(task, "app.flaky", 11.2, retries=1, **lineage),
        started(task, 12.0),
        failed(task, 13.0, "KeyError('x')"),
    )

    (span,) = memory.get_finished_spans()
    assert span.start_time == 10_000_000_000
    assert span.context.trace_id == uuid.UUID(parent).int
    assert span.parent.span_id == tracing._span_id(parent)
    assert span.context.span_id == tracing._span_id(task)
    assert span.attributes["celery.retries"] == 1
    assert span.attributes["celery.queue_wait_seconds"] == 0.5
    assert span.attributes["celery.run_seconds"] == 1.0
    assert [event.name for event in span.events] == [
        "received",
        "started",
        "retry",
        "received",
        "started",
        "exception",
    ]
    retry = span.events[2].attributes
    assert (retry["exception.type"], retry["exception.message"], retry["celery.retries"]) == (
        "RuntimeError",
        "later",
        1,
    )
    assert span.status.description == "KeyError: x"


def test_a_redelivery_seen_before_its_retry_keeps_every_delivery_in_order() -> None:
    tracker, memory = _scene()
    task = str(uuid.uuid4())
    # The worker's pool process sends task-retried; the redelivery's task-received,
    # from the worker itself, can overtake it.
    _feed(
        tracker,
        received(task, "app.flaky", 10.0),
        started(task, 10.5),
        received(task, "app.flaky", 11.2, retries=1),
        event("task-retried", 11.0, uuid=task, exception="RuntimeError('later')"),
        started(task, 12.0),
        succeeded(task, 13.0, runtime=1.0),
    )

    (span,) = memory.get_finished_spans()
    assert [(event.name, event.timestamp) for event in span.events] == [
        ("received", 10_000_000_000),
        ("started", 10_500_000_000),
        ("retry", 11_000_000_000),
        ("received", 11_200_000_000),
        ("started", 12_000_000_000),
    ]
    assert span.attributes["celery.retries"] == 1
    assert span.attributes["celery.queue_wait_seconds"] == 0.5  # to the first start
    assert span.attributes["celery.run_seconds"] == 1.0  # from the last start
    assert span.status.is_unset


def test_sampling_keeps_or_drops_whole_workflows_the_same_everywhere() -> None:
    kept = []
    for _replica in range(2):
        tracker, memory = _scene(ratio=0.5)
        for n in range(200):
            root, child = f"root-{n}", f"child-{n}"
            _feed(
                tracker,
                sent(root, "app.a", "celery", 1.0),
                sent(child, "app.b", "celery", 2.0, root_id=root, parent_id=root),
                succeeded(root, 3.0, runtime=1.0),
                succeeded(child, 4.0, runtime=1.0),
            )
        names = [span.attributes["messaging.message.id"] for span in memory.get_finished_spans()]
        roots = {name.split("-")[1] for name in names if name.startswith("root")}
        assert roots == {name.split("-")[1] for name in names if name.startswith("child")}
        kept.append(roots)
    assert kept[0] == kept[1]
    assert 70 < len(kept[0]) < 130


class _Recorder(SpanExporter):
    """Keeps the finished traces as the span processor hands them over."""

    def __init__(self) -> None:
        self.traces: list[tracing.TaskTrace] = []

    def export(self, spans: Any) -> SpanExportResult:
        self.traces.extend(spans)
        return SpanExportResult.SUCCESS


def test_the_wire_encoding_is_what_the_sdk_encoder_produces() -> None:
    recorder = _Recorder()
    tracker = Tracker(
        Metrics(),
        max_tracked_tasks=10,
        default_queue="celery",
        worker_timeout=30,
        purge_offline_after=600,
        max_label_values=100,
        spans=tracing.Spans(SimpleSpanProcessor(recorder)),
    )
    a, b = _ids(2)
    _feed(
        tracker,
        sent(a, "app.add", "celery", 1.0),
        received(a, "app.add", 1.5),
        started(a, 2.0),
        succeeded(a, 3.0, runtime=1.0),
        sent(b, "app.fail", None, 4.0, root_id=a, parent_id=a),
        event("task-retried", 4.5, uuid=b, exception="OSError(-1)"),
        failed(b, 5.0, "ValueError('ünïcode')"),
    )
    traces = recorder.traces
    resource, scope = tracing.origin()
    expected = encode_spans([tracing.readable_span(trace, resource, scope) for trace in traces])
    for resource_spans in expected.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                span.flags = 0  # optional; ours leave it out
    encoder = otlp.Encoder(resource.attributes, scope.name, scope.version)
    assert ExportTraceServiceRequest.FromString(encoder.encode(traces)) == expected


def test_standard_environment_variables_choose_the_destination() -> None:
    sender = otlp.HttpSender(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
            "OTEL_EXPORTER_OTLP_HEADERS": "x-team=billing,authorization=Bearer%20t",
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "2500",
            "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
        }
    )
    assert sender.endpoint == "http://collector:4318/v1/traces"
    assert sender.headers == {
        "Content-Type": "application/x-protobuf",
        "x-team": "billing",
        "authorization": "Bearer t",
        "Content-Encoding": "gzip",
    }
    assert sender.timeout == 2.5
    traces = otlp.HttpSender(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://tempo:4318/otlp",
        }
    )
    assert traces.endpoint == "http://tempo:4318/otlp"
    assert otlp.HttpSender({}).endpoint == "http://localhost:4318/v1/traces"


def test_gzip_batches_reach_the_collector(collector: OtlpReceiver) -> None:
    spans = tracing.build(
        1.0,
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": collector.endpoint,
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip",
        },
    )
    tracker = Tracker(
        Metrics(),
        max_tracked_tasks=10,
        default_queue="celery",
        worker_timeout=30,
        purge_offline_after=600,
        max_label_values=100,
        spans=spans,
    )
    a = str(uuid.uuid4())
    _feed(tracker, sent(a, "app.add", "celery", 1.0), succeeded(a, 2.0, runtime=1.0))
    spans.close()
    (span,) = collector.spans
    assert (span.name, span.trace_id, span.resource["service.name"]) == (
        "app.add",
        _hex(a),
        "celery",
    )


def test_batches_share_a_connection_and_one_the_collector_closed_loses_nothing(
    collector: OtlpReceiver,
) -> None:
    sender = otlp.HttpSender({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": collector.endpoint})
    resource, scope = tracing.origin()
    body = otlp.Encoder(resource.attributes, scope.name, scope.version).encode([])
    sender.send(body)
    sender.send(body)
    assert (collector.requests, len(collector.connections)) == (2, 1)
    collector.drop_connections()
    sender.send(body)  # fails on the closed connection, then goes on a new one
    assert (collector.requests, len(collector.connections)) == (3, 2)
    sender.close()


def _start(
    argv: list[str], env: dict[str, str] | None = None, prelude: str = ""
) -> subprocess.CompletedProcess:
    """The CLI in a child process that must stop at once, before any broker is reached."""
    code = f"import sys\n{prelude}\nfrom exporter.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "--broker-url",
            "redis://127.0.0.1:9/0",
            "--otlp-traces",
            *argv,
        ],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_without_the_opentelemetry_packages_the_start_stops_clearly() -> None:
    result = _start([], prelude="sys.modules['opentelemetry'] = None")
    assert result.returncode == 2
    assert result.stderr == (
        "celery-events-exporter: error: otlp_traces: needs the OpenTelemetry packages "
        "(opentelemetry.sdk is missing): pip install 'celery-events-exporter[tracing]'\n"
    )


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "grpc",
            "otlp_traces: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=grpc needs "
            "opentelemetry-exporter-otlp-proto-grpc: "
            "pip install opentelemetry-exporter-otlp-proto-grpc",
        ),
        (
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "http/json",
            "otlp_traces: OTEL_EXPORTER_OTLP_PROTOCOL: expected one of http/protobuf, grpc, got "
            "'http/json'",
        ),
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "collector:4318",
            "otlp_traces: the OTLP endpoint must be an http:// or https:// URL, got "
            "'collector:4318/v1/traces'",
        ),
    ],
)
def test_an_unusable_protocol_stops_the_start(variable: str, value: str, message: str) -> None:
    result = _start([], env={variable: value})
    assert result.returncode == 2
    assert result.stderr == f"celery-events-exporter: error: {message}\n"
