"""Traces from the event stream: real OTLP/HTTP requests from real workflows.

An OTLP receiver in the test process decodes what the exporter posts with
the OTLP protobuf classes; Celery workers run chains, groups and failures
on a real Redis server. Hand-made events cover what a worker cannot be
made to do on demand (eviction, sampling of many workflows).
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
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
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

from exporter import __version__
from exporter.telemetry import otlp, tracing
from exporter.telemetry.delivery import (
    ReadableSpanExporter,
    SpanCounts,
    SpanQueue,
    origin,
    readable_span,
)
from exporter.telemetry.metrics import Metrics
from exporter.telemetry.sampling import Sampling, sampler_ratio, task_span_id
from exporter.telemetry.span_hooks import Spans
from exporter.telemetry.spans import TaskTrace
from exporter.track.tracker import Tracker
from tests.celery_app import make_app
from tests.events import event, failed, received, sent, started, succeeded
from tests.harness import ROOT, ExporterProcess
from tests.otlp_endpoint import OtlpEndpoint
from tests.servers import wait_for

PRODUCER, CONSUMER = 4, 5  # SpanKind.SPAN_KIND_PRODUCER, _CONSUMER in OTLP
ERROR = 2  # StatusCode.STATUS_CODE_ERROR


@dataclass(frozen=True)
class Span:
    """One received span, with ids as hex and values as Python values."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    trace_state: str
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
                    trace_state=span.trace_state,
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


def _traced_exporter(
    broker_url: str, receiver: OtlpReceiver, *argv: str, env: dict[str, str] | None = None
) -> ExporterProcess:
    process = ExporterProcess(
        ["--broker-url", broker_url, "--otlp-traces", *argv],
        env={
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_SERVICE_NAME": "billing",
            **(env or {}),
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


def _scrape_exemplars(url: str) -> dict[str, set[str]]:
    """Trace ids of the exemplars in an OpenMetrics scrape, by histogram."""
    request = urllib.request.Request(
        url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read().decode()
    found: dict[str, set[str]] = {}
    for family in openmetrics_families(text):
        for sample in family.samples:
            if sample.exemplar is not None:
                found.setdefault(family.name, set()).add(sample.exemplar.labels["trace_id"])
    return found


def _tree(spans: list[Span]) -> dict[str, Span]:
    """Spans by (kind, task id, execution number in time order)."""
    keyed: dict[str, Span] = {}
    for span in sorted(spans, key=lambda span: span.start):
        task = span.attributes["messaging.message.id"]
        kind = "send" if span.kind == PRODUCER else "process"
        number = sum(1 for key in keyed if key.startswith(f"{kind} {task} "))
        keyed[f"{kind} {task} {number}"] = span
    return keyed


def test_workflows_become_trees_of_publishes_and_executions(
    clean_redis: Any, collector: OtlpReceiver, worker_factory: Callable[..., Any]
) -> None:
    unsampled, halved = OtlpReceiver(), OtlpReceiver()
    traced = _traced_exporter(clean_redis.url, collector)
    dropped = _traced_exporter(clean_redis.url, unsampled, "--trace-sample-ratio", "0")
    sampled = _traced_exporter(
        clean_redis.url,
        halved,
        env={"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"},
    )
    exporters = (traced, dropped, sampled)
    try:
        worker = worker_factory(clean_redis.url)
        wait_for(
            lambda: all(
                e.sample("celery_worker_up", {"hostname": worker.hostname}) == 1 for e in exporters
            ),
            timeout=30,
            message="no heartbeat from the worker",
        )
        assert traced.sample("celery_exporter_spans_total", {"outcome": "retried"}) == 0
        app = make_app(clean_redis.url)
        # Once the exporters have seen a publish, they hold a task's events until its
        # task-sent (sent after the message) arrives: the trees below are exact.
        (warm_up,) = _ids(1)
        app.send_task("tests.add", (0, 0), task_id=warm_up)
        wait_for(
            lambda: all(
                e.sample("celery_task_sent_total", {"name": "tests.add", "queue": "celery"})
                for e in exporters
            ),
            timeout=30,
            message="no task-sent seen",
        )
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
        failing, retrying = _ids(2)
        app.send_task("tests.fail", ("boom",), task_id=failing)
        app.send_task("tests.retry_then_succeed", (2,), task_id=retrying)
        pairs = [_ids(2) for _ in range(16)]  # workflows for the sampler
        for a, b in pairs:
            chain(
                app.signature("tests.add", (1, 2)).set(task_id=a),
                app.signature("tests.add", (3,)).set(task_id=b),
            ).apply_async()
        everything = {warm_up, first, second, head, left, right, failing, retrying}
        everything |= {task for pair in pairs for task in pair}
        wanted = 2 * len(everything) + 2  # a publish and an execution each; two more runs

        def arrived() -> bool:
            spans = list(collector.spans)
            done = {s.attributes["messaging.message.id"] for s in spans if s.kind == CONSUMER}
            return everything <= done and len(spans) >= wanted

        wait_for(arrived, timeout=60, message=lambda: f"spans: {len(collector.spans)}")
        exemplars = _scrape_exemplars(traced.url)
        wait_for(  # counted once the collector's answer is read
            lambda: traced.sample("celery_exporter_spans_total", {"outcome": "exported"}) == wanted,
            timeout=10,
            message="exported spans not counted",
        )
        assert traced.sample("celery_exporter_spans_total", {"outcome": "dropped"}) == 0
        assert traced.stop() == 0
        assert dropped.stop() == 0  # stopping flushes: anything sampled would be sent by now
        assert sampled.stop() == 0
    finally:
        for exporter in exporters:
            exporter.stop()
        unsampled.stop()
        halved.stop()
    assert unsampled.spans == []
    assert unsampled.requests == 0
    assert len(collector.spans) == wanted  # each exported once

    tree = _tree(collector.spans)
    assert len(tree) == wanted
    assert len({span.span_id for span in collector.spans}) == wanted

    # The chain: one trace, named by the root task's uuid. The first task's publish is
    # the root, its execution below it; the second task was published by that execution.
    root = _hex(first)
    assert {tree[f"{k} {t} 0"].trace_id for k in ("send", "process") for t in (first, second)} == {
        root
    }
    assert tree[f"send {first} 0"].parent_id == ""
    assert tree[f"process {first} 0"].parent_id == tree[f"send {first} 0"].span_id
    assert tree[f"send {second} 0"].parent_id == tree[f"process {first} 0"].span_id
    assert tree[f"process {second} 0"].parent_id == tree[f"send {second} 0"].span_id
    # The group applied by the chain: both members published by the head's execution.
    for member in (left, right):
        assert tree[f"send {member} 0"].parent_id == tree[f"process {head} 0"].span_id
        assert tree[f"process {member} 0"].parent_id == tree[f"send {member} 0"].span_id
        assert tree[f"send {member} 0"].trace_id == _hex(head)

    for task_id in (first, second, head, left, right):
        publish, execution = tree[f"send {task_id} 0"], tree[f"process {task_id} 0"]
        assert (publish.name, publish.kind) == ("send tests.add", PRODUCER)
        # The publisher stamps task-sent once the message is on the queue: one that
        # stalls there stamps it after the worker started the task (a wait of 0).
        assert publish.start == publish.end and execution.start <= execution.end
        assert publish.attributes["messaging.operation.name"] == "send"
        assert publish.attributes["messaging.operation.type"] == "send"
        assert publish.attributes["messaging.destination.name"] == "celery"
        assert (execution.name, execution.kind) == ("process tests.add", CONSUMER)
        assert execution.status == (0, "")
        assert execution.events == ()
        attributes = execution.attributes
        assert attributes["messaging.system"] == "celery"
        assert attributes["messaging.operation.name"] == "process"
        assert attributes["messaging.operation.type"] == "process"
        assert attributes["messaging.destination.name"] == "celery"
        assert attributes["celery.task.name"] == "tests.add"
        assert attributes["celery.worker.hostname"] == worker.hostname
        assert attributes["celery.retries"] == 0
        assert attributes["celery.state"] == "SUCCESS"
        assert "error.type" not in attributes and "SampleRate" not in attributes
        wait = attributes["celery.queue_wait_seconds"]
        assert wait == pytest.approx(max(0.0, (execution.start - publish.start) / 1e9), abs=1e-3)
        assert execution.resource["service.name"] == "billing"
        assert publish.trace_state == execution.trace_state == ""

    failure = tree[f"process {failing} 0"]
    assert failure.name == "process tests.fail"
    assert failure.status == (ERROR, "boom")
    assert failure.attributes["error.type"] == "ValueError"
    assert failure.attributes["celery.state"] == "FAILURE"
    ((name, at, exception),) = failure.events
    assert (name, at) == ("exception", failure.end)
    assert exception["exception.type"] == "ValueError"
    assert exception["exception.message"] == "boom"
    assert "ValueError: boom" in exception["exception.stacktrace"]

    # The retried task: three executions, siblings under its one publish.
    publish = tree[f"send {retrying} 0"]
    runs = [tree[f"process {retrying} {n}"] for n in range(3)]
    assert [run.parent_id for run in runs] == [publish.span_id] * 3
    assert [run.attributes["celery.state"] for run in runs] == ["RETRY", "RETRY", "SUCCESS"]
    assert [run.attributes["celery.retries"] for run in runs] == [0, 1, 2]
    assert runs[0].end <= runs[1].start and runs[1].end <= runs[2].start
    # The exception, unless the task-retried came after the next run's end (see below).
    assert {e["exception.type"] for run in runs[:2] for _, _, e in run.events} <= {"RuntimeError"}
    assert runs[2].events == ()
    assert all(run.status == (0, "") and "error.type" not in run.attributes for run in runs)

    # Sampling at a half: the workflows whose trace id passes the threshold, whole, and
    # the threshold recorded on every span.
    kept = {span.trace_id for span in halved.spans}
    everything_traces = {span.trace_id for span in collector.spans}
    expected = {t for t in everything_traces if int(t, 16) & (2**56 - 1) >= 2**55}
    assert kept == expected
    assert 0 < len(kept) < len(everything_traces)
    for trace_id in kept:
        assert sorted(s.span_id for s in halved.spans if s.trace_id == trace_id) == sorted(
            s.span_id for s in collector.spans if s.trace_id == trace_id
        )
    assert {span.trace_state for span in halved.spans} == {"ot=th:8"}
    assert {span.attributes["SampleRate"] for span in halved.spans} == {2}

    # Exemplars link both histograms to traces the collector received.
    assert set(exemplars) == {"celery_task_runtime_seconds", "celery_task_queue_wait_seconds"}
    for trace_ids in exemplars.values():
        assert trace_ids and trace_ids <= everything_traces


def test_without_sent_events_executions_stand_alone(
    clean_redis: Any, collector: OtlpReceiver, worker_factory: Callable[..., Any]
) -> None:
    traced = _traced_exporter(clean_redis.url, collector)
    try:
        worker = worker_factory(clean_redis.url, sent_events=False)
        wait_for(
            lambda: traced.sample("celery_worker_up", {"hostname": worker.hostname}) == 1,
            timeout=30,
            message="no heartbeat from the worker",
        )
        app = make_app(clean_redis.url, sent_events=False)
        first, second, retrying = _ids(3)
        chain(
            app.signature("tests.add", (1, 2)).set(task_id=first),
            app.signature("tests.add", (3,)).set(task_id=second),
        ).apply_async()
        app.send_task("tests.retry_then_succeed", (1,), task_id=retrying)
        wait_for(
            lambda: len(collector.spans) >= 4,
            timeout=60,
            message=lambda: f"spans: {collector.spans}",
        )
        assert traced.stop() == 0
    finally:
        traced.stop()
    assert {span.kind for span in collector.spans} == {CONSUMER}
    tree = _tree(collector.spans)
    assert set(tree) == {
        f"process {first} 0",
        f"process {second} 0",
        f"process {retrying} 0",
        f"process {retrying} 1",
    }
    assert tree[f"process {first} 0"].parent_id == ""
    assert tree[f"process {second} 0"].parent_id == tree[f"process {first} 0"].span_id
    runs = [tree[f"process {retrying} {n}"] for n in range(2)]
    assert [run.parent_id for run in runs] == ["", ""]
    assert [run.attributes["celery.state"] for run in runs] == ["RETRY", "SUCCESS"]
    # Without a publish, the wait is from task-received (a redelivery's can overtake
    # the retry, which then leaves it unknown).
    assert runs[0].attributes["celery.queue_wait_seconds"] >= 0


def traced_tracker(metrics: Metrics, spans: Spans | None, max_tracked_tasks: int = 100) -> Tracker:
    """A tracker whose span hooks are ``spans``."""
    return Tracker(
        metrics,
        max_tracked_tasks=max_tracked_tasks,
        default_queue="celery",
        worker_timeout=30,
        purge_offline_after=600,
        max_label_values=100,
        spans=spans,
    )


def _scene(
    max_tracked_tasks: int = 100, ratio: float = 1.0
) -> tuple[Tracker, InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    exporter = ReadableSpanExporter(memory, *origin())
    spans = Spans(SimpleSpanProcessor(exporter), ratio)
    return traced_tracker(Metrics(), spans, max_tracked_tasks), memory


def _feed(tracker: Tracker, *events: dict) -> None:
    for item in events:
        tracker.handle(item, item["timestamp"])


def _by_kind(memory: InMemorySpanExporter) -> tuple[list[Any], list[Any]]:
    """Finished SDK spans: the publishes, and the executions in order."""
    spans = memory.get_finished_spans()
    return (
        [span for span in spans if span.kind == SpanKind.PRODUCER],
        [span for span in spans if span.kind == SpanKind.CONSUMER],
    )


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
    publishes, executions = _by_kind(memory)
    assert [span.name for span in publishes] == ["send app.slow", "send app.add"]
    assert executions == []
    _feed(tracker, sent(c, "app.add", "celery", 103.0))  # the table is full: a goes

    _, (span,) = _by_kind(memory)
    assert span.name == "process app.slow"
    assert span.attributes["celery.incomplete"] is True
    assert "celery.state" not in span.attributes
    assert span.status.is_unset
    assert (span.start_time, span.end_time) == (101_000_000_000, 101_000_000_000)
    assert span.parent.span_id == publishes[0].context.span_id
    _feed(tracker, succeeded(a, 104.0, runtime=3.0))  # too late: no second span
    assert len(_by_kind(memory)[1]) == 1


def test_retries_are_sibling_executions_under_one_publish() -> None:
    tracker, memory = _scene()
    task = str(uuid.uuid4())
    _feed(
        tracker,
        sent(task, "app.flaky", "celery", 10.0),
        received(task, "app.flaky", 10.2),
        started(task, 10.5),
        event("task-retried", 11.0, uuid=task, exception="RuntimeError('later')"),
        sent(task, "app.flaky", "celery", 11.1, retries=1),  # the retry's own publish
        received(task, "app.flaky", 11.2, retries=1),
        started(task, 12.0, hostname="celery@w2"),
        failed(task, 13.0, "KeyError('x')", hostname="celery@w2"),
    )

    (publish,), (first, second) = _by_kind(memory)
    assert (publish.start_time, publish.end_time) == (10_000_000_000, 10_000_000_000)
    assert publish.parent is None
    assert publish.context.span_id == task_span_id(task)
    assert first.parent.span_id == second.parent.span_id == publish.context.span_id
    assert len({publish.context.span_id, first.context.span_id, second.context.span_id}) == 3
    assert (first.start_time, first.end_time) == (10_500_000_000, 11_000_000_000)
    assert (second.start_time, second.end_time) == (12_000_000_000, 13_000_000_000)
    assert first.attributes["celery.state"] == "RETRY"
    assert first.status.is_unset and "error.type" not in first.attributes
    ((retry),) = first.events
    assert (retry.name, retry.attributes["exception.type"]) == ("exception", "RuntimeError")
    assert first.attributes["celery.queue_wait_seconds"] == 0.5
    assert second.attributes["celery.queue_wait_seconds"] == pytest.approx(0.9)
    assert second.attributes["celery.retries"] == 1
    assert second.attributes["celery.worker.hostname"] == "celery@w2"
    assert second.attributes["error.type"] == "KeyError"
    assert (second.status.status_code, second.status.description) == (StatusCode.ERROR, "x")


def test_without_sent_events_executions_hang_below_the_parents_execution() -> None:
    tracker, memory = _scene()
    parent, child = _ids(2)
    lineage = {"root_id": parent, "parent_id": parent}
    _feed(
        tracker,
        received(parent, "app.flaky", 1.0),
        started(parent, 1.5),
        event("task-retried", 2.0, uuid=parent, exception="OSError(-1)"),
        received(parent, "app.flaky", 2.5, retries=1),
        started(parent, 3.0),
        received(child, "app.add", 3.2, **lineage),  # published by the second execution
        started(child, 3.4),
        succeeded(child, 3.6, runtime=0.2),
        succeeded(parent, 4.0, runtime=1.0),
    )
    publishes, (first, child_run, second) = _by_kind(memory)
    assert publishes == []
    assert first.parent is None and second.parent is None
    assert child_run.parent.span_id == second.context.span_id
    assert child_run.context.trace_id == uuid.UUID(parent).int
    assert second.attributes["celery.queue_wait_seconds"] == 0.5  # from task-received


@pytest.mark.parametrize("late", [1, 2, 3])
def test_a_publish_seen_after_the_workers_events_is_still_exported(late: int) -> None:
    tracker, memory = _scene()
    parent, child = _ids(2)
    lineage = {"root_id": parent, "parent_id": parent}
    _feed(
        tracker,
        sent(parent, "app.flow", "celery", 1.0),
        received(parent, "app.flow", 1.1),
        started(parent, 1.2),
    )
    # Celery sends task-sent after the message. The tracker holds the worker's
    # events of an unnamed task a while; a publisher that stalls longer is seen
    # after the task-received, the task-started, even the task-succeeded.
    events = [
        received(child, "app.add", 2.1, **lineage),
        started(child, 2.2),
        succeeded(child, 2.3, runtime=0.1),
    ]
    _feed(tracker, *events[:late])
    tracker.tick(10.0)
    _feed(
        tracker,
        sent(child, "app.add", "fast", 2.0, **lineage),
        *events[late:],
        succeeded(parent, 3.0, runtime=1.8),
    )
    publishes, (child_run, parent_run) = _by_kind(memory)
    assert [span.name for span in publishes] == ["send app.flow", "send app.add"]
    publish = publishes[1]
    assert publish.start_time == publish.end_time == 2_000_000_000
    assert publish.parent.span_id == parent_run.context.span_id
    assert publish.context.trace_id == child_run.context.trace_id == uuid.UUID(parent).int
    assert publish.attributes["messaging.destination.name"] == "fast"
    assert (child_run.start_time, child_run.end_time) == (2_200_000_000, 2_300_000_000)
    # Below the publish when it came before the execution ended; beside it after.
    above = publish if late < 3 else parent_run
    assert child_run.parent.span_id == above.context.span_id


@pytest.mark.parametrize(
    ("late", "retried", "ended"),
    [(3, 11.0, 11.0), (4, 11.0, 11.0), (4, 12.5, 12.0), (6, 11.0, 12.0)],
)
def test_a_redelivery_seen_before_its_retry_keeps_executions_apart(
    late: int, retried: float, ended: float
) -> None:
    tracker, memory = _scene()
    task = str(uuid.uuid4())
    # The worker sends task-retried when the pool reports the retry: the retry's
    # own task-received, its task-started, even its task-succeeded can come first,
    # stamped earlier. An execution ends by the time the next one began.
    events = [
        received(task, "app.flaky", 10.0),
        started(task, 10.5),
        received(task, "app.flaky", 11.2, retries=1),
        started(task, 12.0),
        succeeded(task, 13.0, runtime=1.0),
    ]
    events.insert(late, event("task-retried", retried, uuid=task, exception="RuntimeError('x')"))
    _feed(tracker, *events)
    _, executions = _by_kind(memory)
    assert sorted((span.start_time, span.end_time) for span in executions) == [
        (10_500_000_000, int(ended * 1e9)),
        (12_000_000_000, 13_000_000_000),
    ]
    states = {
        span.attributes["celery.retries"]: span.attributes["celery.state"] for span in executions
    }
    assert states == {0: "RETRY", 1: "SUCCESS"}


def test_a_lost_worker_ends_the_execution_with_an_error() -> None:
    tracker, memory = _scene()
    task = str(uuid.uuid4())
    _feed(tracker, sent(task, "app.long", "celery", 1.0), started(task, 2.0))
    before = time.time_ns()
    tracker.spans.interrupted(tracker.tasks[task], "celery@w1")
    _, (lost,) = _by_kind(memory)
    assert lost.status.status_code == StatusCode.ERROR
    assert lost.status.description == "worker lost: celery@w1"
    assert lost.attributes["error.type"] == "WorkerLost"
    assert lost.start_time == 2_000_000_000 and before <= lost.end_time <= time.time_ns()
    # Redelivered to another worker, it runs again: a second execution.
    _feed(tracker, started(task, 5.0, hostname="celery@w2"), succeeded(task, 6.0, runtime=1.0))
    (publish,), (_, again) = _by_kind(memory)
    assert again.attributes["celery.state"] == "SUCCESS"
    assert again.parent.span_id == lost.parent.span_id == publish.context.span_id
    assert again.context.span_id != lost.context.span_id


def test_sampling_keeps_or_drops_whole_workflows_the_same_everywhere() -> None:
    kept = []
    for _replica in range(2):
        tracker, memory = _scene(ratio=0.25)
        for n in range(400):
            root, child = f"root-{n}", f"child-{n}"
            _feed(
                tracker,
                sent(root, "app.a", "celery", 1.0),
                sent(child, "app.b", "celery", 2.0, root_id=root, parent_id=root),
                succeeded(root, 3.0, runtime=1.0),
                succeeded(child, 4.0, runtime=1.0),
            )
        spans = memory.get_finished_spans()
        names = [span.attributes["messaging.message.id"] for span in spans]
        roots = {name.split("-")[1] for name in names if name.startswith("root")}
        assert roots == {name.split("-")[1] for name in names if name.startswith("child")}
        assert {span.context.trace_state.get("ot") for span in spans} == {"th:c"}
        assert {span.attributes["SampleRate"] for span in spans} == {4}
        kept.append(roots)
    assert kept[0] == kept[1]
    assert 60 < len(kept[0]) < 140


@pytest.mark.parametrize(
    ("environ", "option", "ratio"),
    [
        ({}, 0.3, 0.3),
        ({"OTEL_TRACES_SAMPLER": "always_on"}, 1.0, 1.0),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, 1.0, 0.0),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, 1.0, 0.0),
        ({"OTEL_TRACES_SAMPLER": "traceidratio"}, 1.0, 1.0),
        ({"OTEL_TRACES_SAMPLER": "TraceIdRatio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}, 1.0, 0.1),
        (
            {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"},
            1.0,
            0.5,
        ),
    ],
)
def test_the_standard_sampler_variables(environ: dict, option: float, ratio: float) -> None:
    assert sampler_ratio(environ, option) == ratio


class _Recorder(SpanExporter):
    """Keeps the finished traces as the span processor hands them over."""

    def __init__(self) -> None:
        self.traces: list[TaskTrace] = []

    def export(self, spans: Any) -> SpanExportResult:
        self.traces.extend(spans)
        return SpanExportResult.SUCCESS


def test_the_wire_encoding_is_what_the_sdk_encoder_produces() -> None:
    recorder = _Recorder()
    tracker = traced_tracker(Metrics(), Spans(SimpleSpanProcessor(recorder), 0.5))
    sampling = Sampling(0.5)
    a = next(i for i in iter(lambda: str(uuid.uuid4()), "") if sampling.keeps(uuid.UUID(i).int))
    b = str(uuid.uuid4())
    _feed(
        tracker,
        sent(a, "app.add", "celery", 1.0),
        received(a, "app.add", 1.5),
        started(a, 2.0),
        succeeded(a, 3.0, runtime=1.0),
        sent(b, "app.fail", None, 4.0, root_id=a, parent_id=a),
        started(b, 4.2),
        event("task-retried", 4.5, uuid=b, exception="OSError(-1)"),
        started(b, 4.7),
        # Lengths of one, two and three varint bytes.
        failed(b, 5.0, f"ValueError('ünïcode {'x' * 200}')", traceback="  line\n" * 3000),
    )
    traces = recorder.traces
    assert [trace.kind for trace in traces] == [4, 5, 4, 5, 5]
    assert {trace.trace_state for trace in traces} == {"ot=th:8"}
    resource, scope = origin()
    expected = encode_spans([readable_span(trace, resource, scope) for trace in traces])
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
        "User-Agent": f"celery-events-exporter/{__version__}",
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
    metrics = Metrics()
    spans = tracing.build(
        metrics,
        1.0,
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": collector.endpoint,
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip",
        },
    )
    tracker = traced_tracker(metrics, spans)
    a = str(uuid.uuid4())
    _feed(tracker, sent(a, "app.add", "celery", 1.0), succeeded(a, 2.0, runtime=1.0))
    spans.close()
    assert [
        (span.name, span.trace_id, span.resource["service.name"]) for span in collector.spans
    ] == [
        ("send app.add", _hex(a), "celery"),
        ("process app.add", _hex(a), "celery"),
    ]
    assert collector.user_agents == {f"celery-events-exporter/{__version__}"}
    counted = metrics.counter("celery_exporter_spans_total").values
    assert counted == {("exported",): 2, ("dropped",): 0, ("retried",): 0}


def test_batches_share_a_connection_and_one_the_collector_closed_loses_nothing(
    collector: OtlpReceiver,
) -> None:
    sender = otlp.HttpSender({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": collector.endpoint})
    resource, scope = origin()
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
        (
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
            "zstd",
            "otlp_traces: OTEL_EXPORTER_OTLP_TRACES_COMPRESSION: expected one of gzip, none, "
            "got 'zstd'",
        ),
        (
            "OTEL_EXPORTER_OTLP_TIMEOUT",
            "soon",
            "otlp_traces: OTEL_EXPORTER_OTLP_TIMEOUT: expected a positive number of "
            "milliseconds, got 'soon'",
        ),
        (
            "OTEL_TRACES_SAMPLER",
            "jaeger_remote",
            "otlp_traces: OTEL_TRACES_SAMPLER: expected one of always_on, always_off, "
            "traceidratio, parentbased_always_on, parentbased_always_off, "
            "parentbased_traceidratio, got 'jaeger_remote'",
        ),
    ],
)
def test_an_unusable_protocol_stops_the_start(variable: str, value: str, message: str) -> None:
    result = _start([], env={variable: value})
    assert result.returncode == 2
    assert result.stderr == f"celery-events-exporter: error: {message}\n"


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (
            [],
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
            "otlp_traces: OTEL_TRACES_SAMPLER_ARG: expected a ratio from 0 to 1, got '2'",
        ),
        (
            ["--trace-sample-ratio", "0.5"],
            {"OTEL_TRACES_SAMPLER": "always_on"},
            "trace_sample_ratio: set it or OTEL_TRACES_SAMPLER, not both "
            "(OTEL_TRACES_SAMPLER=always_on)",
        ),
    ],
)
def test_an_unusable_sampler_stops_the_start(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    result = _start(argv, env=env)
    assert result.returncode == 2
    assert result.stderr == f"celery-events-exporter: error: {message}\n"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"OTEL_BSP_MAX_QUEUE_SIZE": "lots"},
            "otlp_traces: OTEL_BSP_MAX_QUEUE_SIZE: expected an integer of at least 1, got 'lots'",
        ),
        (
            {"OTEL_BSP_SCHEDULE_DELAY": "0"},
            "otlp_traces: OTEL_BSP_SCHEDULE_DELAY: expected an integer of at least 1, got '0'",
        ),
        (
            {"OTEL_BSP_MAX_QUEUE_SIZE": "100", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "200"},
            "otlp_traces: OTEL_BSP_MAX_EXPORT_BATCH_SIZE (200) must not exceed "
            "OTEL_BSP_MAX_QUEUE_SIZE (100)",
        ),
    ],
)
def test_unusable_batching_stops_the_start(env: dict[str, str], message: str) -> None:
    result = _start([], env=env)
    assert result.returncode == 2
    assert result.stderr == f"celery-events-exporter: error: {message}\n"


class KeptBatches:
    """A batch exporter that keeps what it is sent; a batch holding "bad" fails to encode."""

    def __init__(self) -> None:
        self.sent: list[list[Any]] = []

    def prepare(self, spans: list[Any]) -> list[Any]:
        if "bad" in spans:
            raise ValueError("unencodable")
        return spans

    def send(self, batch: list[Any], size: int) -> None:
        assert len(batch) == size
        self.sent.append(batch)

    def stopping(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def test_the_span_queue_sends_full_batches_and_the_rest_after_the_delay() -> None:
    metrics = Metrics()
    exporter = KeptBatches()
    queue = SpanQueue(
        exporter,
        SpanCounts(metrics.counter("celery_exporter_spans_total")),
        schedule_delay_ms=100,
        max_queue_size=8,
        max_export_batch_size=4,
    )
    for span in range(6):
        queue.on_end(span)
    wait_for(lambda: exporter.sent == [[0, 1, 2, 3], [4, 5]], message=lambda: str(exporter.sent))
    for span in ("bad", 6, 7, 8, 9):  # a batch that cannot be encoded costs itself only
        queue.on_end(span)
    queue.shutdown()
    assert exporter.sent[2:] == [[9]]
    assert metrics.counter("celery_exporter_spans_total").get(("dropped",)) == 4


def test_exemplars_name_the_latest_execution_in_each_bucket_only_when_traced() -> None:
    metrics = Metrics()
    memory = InMemorySpanExporter()
    exporter = ReadableSpanExporter(memory, *origin())
    tracker = traced_tracker(metrics, Spans(SimpleSpanProcessor(exporter), 1.0, metrics))
    untraced = traced_tracker(Metrics(), None)
    a, b, c = _ids(3)
    for task, at, runtime in ((a, 10.0, 0.7), (b, 20.0, 0.8), (c, 30.0, 7.0)):
        for one in (
            sent(task, "app.add", "celery", at),
            started(task, at + 0.3),
            succeeded(task, at + 1.0, runtime=runtime),
        ):
            tracker.handle(one, one["timestamp"])
            untraced.handle(one, one["timestamp"])
    spans = {span.attributes["messaging.message.id"]: span for span in _by_kind(memory)[1]}

    def exemplars(metrics: Metrics) -> dict[tuple[str, str], tuple[str, str, float, float]]:
        registry = CollectorRegistry()
        registry.register(metrics)
        found = {}
        for family in openmetrics_families(openmetrics_latest(registry).decode()):
            for sample in family.samples:
                if sample.exemplar is not None:
                    ids = sample.exemplar.labels
                    found[(family.name, sample.labels["le"])] = (
                        ids["trace_id"],
                        ids["span_id"],
                        sample.exemplar.value,
                        float(sample.exemplar.timestamp),
                    )
        return found

    def ids(task: str) -> tuple[str, str]:
        context = spans[task].context
        return f"{context.trace_id:032x}", f"{context.span_id:016x}"

    assert exemplars(metrics) == {
        ("celery_task_runtime_seconds", "1.0"): (*ids(b), 0.8, 21.0),  # b came after a
        ("celery_task_runtime_seconds", "10.0"): (*ids(c), 7.0, 31.0),
        ("celery_task_queue_wait_seconds", "0.5"): (*ids(c), pytest.approx(0.3), 30.3),
    }
    assert exemplars(untraced.metrics) == {}
