"""OpenTelemetry traces rebuilt from the event stream: one span per task.

A task's span runs from ``task-sent`` (``task-received`` without sent
events) to its final event, and is built and handed to the SDK's
``BatchSpanProcessor`` only then. Its state lives in the tracker's task
record (``Task.trace``), so the task table's bound also bounds open spans.

Ids are derived, never generated, so that spans ending at different times,
or exported by two replicas, meet in one trace and find their parents:

- trace id: the 128-bit value of the workflow's ``root_id`` (the task's
  own uuid when it has none), or the first 128 bits of its BLAKE2b hash
  when the id is not a UUID;
- span id: the first 64 bits of the BLAKE2b hash of the task's uuid; the
  parent span id is the same hash of ``parent_id``;
- sampling: the first 64 bits of the BLAKE2b hash of the root id against
  the ratio, so a workflow is kept or dropped whole by every replica.

This is the only module that imports OpenTelemetry, and the daemon imports
it only when traces are on.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from hashlib import blake2b

from . import __version__, otlp
from .config import ConfigError
from .tracker import Event, Hook, Task, exception_class

try:
    from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import Event as SpanEvent
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
except ImportError as exc:
    raise ConfigError(
        f"otlp_traces: needs the OpenTelemetry packages ({exc.name} is missing): "
        "pip install 'celery-events-exporter[tracing]'") from None

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "celery"
WARN_EVERY_SECONDS = 60.0
PROTOCOLS = ("http/protobuf", "grpc")
SAMPLED = TraceFlags(TraceFlags.SAMPLED)
UNSET = Status(StatusCode.UNSET)
_RANGE64 = 1 << 64


class TaskTrace:
    """What one task's span needs that the task record does not keep."""

    __slots__ = ("events", "hostname", "last_started", "name", "parent_id", "queue", "retried",
                 "retries", "root_id", "start", "started", "uuid")

    def __init__(self, event: Event, root_id: str) -> None:
        self.uuid: str = event["uuid"]
        self.root_id = root_id
        parent_id = event.get("parent_id")
        self.parent_id: str | None = parent_id if isinstance(parent_id, str) else None
        name = event.get("name")
        self.name: str | None = name if isinstance(name, str) and name else None
        self.queue: str | None = None
        self.hostname: str | None = None
        self.start: int = _ns(event["timestamp"])
        self.started: int | None = None  # the first task-started
        self.last_started = 0
        self.retried = 0  # task-retried events seen
        self.retries = 0  # Celery's count, from the events of the redelivered task
        self.events: list[SpanEvent] = []


class Spans:
    """Builds a span per task from the tracker's hooks and hands it to a span processor."""

    def __init__(self, processor: SpanProcessor, resource: Resource,
                 sample_ratio: float = 1.0) -> None:
        self.processor = processor
        self.resource = resource
        self.sample_ratio = sample_ratio
        self._threshold = int(sample_ratio * _RANGE64)
        self._scope = InstrumentationScope("celery-events-exporter", __version__)

    def hooks(self) -> Mapping[str, Hook]:
        return {
            "task-sent": self._on_sent,
            "task-received": self._on_received,
            "task-started": self._on_started,
            "task-retried": self._on_retried,
            "task-succeeded": self._on_succeeded,
            "task-failed": self._on_failed,
            "task-rejected": self._on_rejected,
            "task-revoked": self._on_revoked,
        }

    def evicted(self, task: Task) -> None:
        """End the span where its last event was, marked incomplete, rather than leak it."""
        state = getattr(task, "trace", None)
        if state is not None:
            end = max((event.timestamp for event in state.events), default=state.start)
            self._emit(task, state, end, UNSET, {"celery.incomplete": True})

    def close(self) -> None:
        """Export what is queued, then stop the export thread."""
        self.processor.shutdown()

    # Hooks, one per event type; the task record is there, its trace state may not be.

    def _begin(self, task: Task, event: Event) -> TaskTrace | None:
        """The span starts at the first task-sent or task-received, if its workflow is sampled."""
        try:
            return task.trace
        except AttributeError:
            pass
        root_id = event.get("root_id")
        if not isinstance(root_id, str) or not root_id:
            root_id = event["uuid"]
        ratio = self.sample_ratio
        sampled = ratio >= 1.0 or (ratio > 0.0 and _hash64(root_id) < self._threshold)
        state = task.trace = TaskTrace(event, root_id) if sampled else None
        return state

    def _on_sent(self, task: Task, event: Event) -> None:
        state = self._begin(task, event)
        if state is not None:
            queue = event.get("queue")
            if isinstance(queue, str) and queue:
                state.queue = queue
            _count_retries(state, event)

    def _on_received(self, task: Task, event: Event) -> None:
        state = self._begin(task, event)
        if state is not None:
            hostname = state.hostname = event["hostname"]
            if state.name is None and isinstance(event.get("name"), str):
                state.name = event["name"]
            _count_retries(state, event)
            received = _ns(event["timestamp"])
            # A client stamps task-sent after publishing: a quick worker's
            # task-received can be earlier, and a span never starts after its events.
            state.start = min(state.start, received)
            state.events.append(SpanEvent("received", {"celery.worker.hostname": hostname},
                                          received))

    def _on_started(self, task: Task, event: Event) -> None:
        state = getattr(task, "trace", None)
        if state is not None:
            hostname = state.hostname = event["hostname"]
            timestamp = _ns(event["timestamp"])
            if state.started is None:
                state.started = timestamp
            state.last_started = timestamp
            state.events.append(SpanEvent("started", {"celery.worker.hostname": hostname},
                                          timestamp))

    def _on_retried(self, task: Task, event: Event) -> None:
        state = getattr(task, "trace", None)
        if state is not None:
            state.retried += 1
            attributes = _exception(event)
            attributes["celery.retries"] = state.retried
            state.events.append(SpanEvent("retry", attributes, _ns(event["timestamp"])))

    def _on_succeeded(self, task: Task, event: Event) -> None:
        self._end(task, event, UNSET, "SUCCESS")

    def _on_failed(self, task: Task, event: Event) -> None:
        state = getattr(task, "trace", None)
        if state is not None:
            attributes = _exception(event)
            state.events.append(SpanEvent("exception", attributes, _ns(event["timestamp"])))
            status = Status(StatusCode.ERROR,
                            f"{attributes['exception.type']}: {attributes['exception.message']}")
            self._end(task, event, status, "FAILURE")

    def _on_rejected(self, task: Task, event: Event) -> None:
        self._end(task, event, UNSET, "REJECTED")

    def _on_revoked(self, task: Task, event: Event) -> None:
        self._end(task, event, UNSET, "REVOKED")

    # Building the span.

    def _end(self, task: Task, event: Event, status: Status, state_name: str) -> None:
        state = getattr(task, "trace", None)
        if state is not None:
            state.hostname = event["hostname"]
            self._emit(task, state, _ns(event["timestamp"]), status, {"celery.state": state_name})

    def _emit(self, task: Task, state: TaskTrace, end: int, status: Status,
              extra: dict[str, object]) -> None:
        task.trace = None
        start = state.start
        end = max(end, start)
        trace_id = _trace_id(state.root_id)
        context = SpanContext(trace_id, _span_id(state.uuid), False, SAMPLED)
        parent = (SpanContext(trace_id, _span_id(state.parent_id), True, SAMPLED)
                  if state.parent_id and state.parent_id != state.uuid else None)
        name = state.name or task.name
        attributes: dict[str, object] = {
            "messaging.system": "celery",
            "messaging.operation.type": "process",
            "messaging.message.id": state.uuid,
            "messaging.destination.name": state.queue or task.queue,
            "celery.task.name": name,
            "celery.retries": max(state.retries, state.retried),
            **extra,
        }
        if state.hostname is not None:
            attributes["celery.worker.hostname"] = state.hostname
        if state.started is not None:
            attributes["celery.queue_wait_seconds"] = max(0, state.started - start) / 1e9
            attributes["celery.run_seconds"] = max(0, end - state.last_started) / 1e9
        state.events.sort(key=_timestamp)
        self.processor.on_end(ReadableSpan(
            name=name, context=context, parent=parent, resource=self.resource,
            attributes=attributes, events=state.events, kind=SpanKind.CONSUMER, status=status,
            start_time=start, end_time=end, instrumentation_scope=self._scope))


class HttpSpanExporter(SpanExporter):
    """OTLP/HTTP protobuf with ``otlp``'s encoder, many times cheaper than the SDK's."""

    def __init__(self, sender: otlp.HttpSender) -> None:
        self.sender = sender
        self._warned_at = -WARN_EVERY_SECONDS

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            self.sender.send(otlp.encode(spans))
        except otlp.ExportError as exc:
            now = time.monotonic()
            if now - self._warned_at >= WARN_EVERY_SECONDS:
                self._warned_at = now
                log.warning("could not export %d spans: %s; further failures are not logged "
                            "for a minute", len(spans), exc)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS


BATCH_DEFAULTS = (("max_queue_size", "OTEL_BSP_MAX_QUEUE_SIZE", 16_384),
                  ("max_export_batch_size", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 2_048))
"""A quarter of a second of spans at 60,000 tasks a second, some 50 MB at most."""
_QUEUE_FULL_LOGGER = "opentelemetry.sdk._shared_internal"


class _OncePerMinute(logging.Filter):
    """The SDK logs each span it drops from a full queue; past the first, that
    logging would cost more than the spans, just when the exporter is behind."""

    def __init__(self) -> None:
        super().__init__()
        self._logged_at = -WARN_EVERY_SECONDS

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Queue full"):
            return True
        now = time.monotonic()
        if now - self._logged_at < WARN_EVERY_SECONDS:
            return False
        self._logged_at = now
        return True


_QUEUE_FULL_ONCE_PER_MINUTE = _OncePerMinute()


def build(sample_ratio: float, environ: Mapping[str, str] | None = None) -> Spans:
    """Spans exported by OTLP as the standard OTEL_* environment variables say."""
    environ = os.environ if environ is None else environ
    resource = Resource.create({SERVICE_NAME: DEFAULT_SERVICE_NAME}).merge(
        OTELResourceDetector().detect())  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win
    # The SDK's defaults (a 2,048-span queue, 512 a request) suit one process's own
    # spans; here every task of the cluster ends a span, thousands a second.
    sizes = {name: None if variable in environ else size
             for name, variable, size in BATCH_DEFAULTS}
    logging.getLogger(_QUEUE_FULL_LOGGER).addFilter(_QUEUE_FULL_ONCE_PER_MINUTE)
    processor = BatchSpanProcessor(_span_exporter(environ), **sizes)
    return Spans(processor, resource, sample_ratio)


def _span_exporter(environ: Mapping[str, str]) -> SpanExporter:
    variable = next((name for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                                       "OTEL_EXPORTER_OTLP_PROTOCOL") if environ.get(name)),
                    None)
    protocol = environ[variable].strip().lower() if variable else PROTOCOLS[0]
    if protocol not in PROTOCOLS:
        raise ConfigError(f"otlp_traces: {variable}: expected one of {', '.join(PROTOCOLS)}, "
                          f"got {protocol!r}")
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )
        except ImportError:
            raise ConfigError(
                f"otlp_traces: {variable}=grpc needs opentelemetry-exporter-otlp-proto-grpc: "
                "pip install opentelemetry-exporter-otlp-proto-grpc") from None
        return GrpcSpanExporter()
    return HttpSpanExporter(otlp.HttpSender(environ))


def _count_retries(state: TaskTrace, event: Event) -> None:
    """Celery's own count: its events for the redelivered task may come before task-retried."""
    retries = event.get("retries")
    if type(retries) is int and retries > state.retries:
        state.retries = retries


def _exception(event: Event) -> dict[str, object]:
    """The semantic-convention attributes of the exception a task-failed or -retried names."""
    text = event.get("exception")
    text = text if isinstance(text, str) else ""
    attributes: dict[str, object] = {"exception.type": exception_class(text),
                                     "exception.message": _exception_message(text)}
    traceback = event.get("traceback")
    if isinstance(traceback, str) and traceback:
        attributes["exception.stacktrace"] = traceback
    return attributes


def _exception_message(text: str) -> str:
    """``boom`` from Celery's ``"ValueError('boom')"``; the text itself when not of that shape."""
    _, paren, rest = text.partition("(")
    if not paren or not rest.endswith(")"):
        return text
    inner = rest[:-1]
    if len(inner) >= 2 and inner[0] == inner[-1] and inner[0] in "'\"":
        return inner[1:-1]
    return inner


def _hash64(text: str) -> int:
    return int.from_bytes(blake2b(text.encode(), digest_size=8).digest())


def _trace_id(root_id: str) -> int:
    """The uuid's own 128 bits (what ``uuid.UUID(root_id).int`` gives, for less)."""
    digits = root_id.replace("-", "")
    try:
        value = int(digits, 16) if len(digits) == 32 and len(root_id) == 36 else 0
    except ValueError:
        value = 0
    return value or int.from_bytes(blake2b(root_id.encode(), digest_size=16).digest())


def _span_id(task_id: str) -> int:
    return _hash64(task_id) or 1


def _ns(timestamp: float) -> int:
    return int(timestamp * 1e9)


def _timestamp(event: SpanEvent) -> int:
    return event.timestamp
