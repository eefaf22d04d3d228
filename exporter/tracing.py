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
- span id: the task's uuid with its two 64-bit halves XORed together (the
  first 64 bits of its BLAKE2b hash when it is not a UUID); the parent span
  id is the same of ``parent_id``;
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
from operator import itemgetter
from typing import Any

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
        "pip install 'celery-events-exporter[tracing]'"
    ) from None

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "celery"
WARN_EVERY_SECONDS = 60.0
PROTOCOLS = ("http/protobuf", "grpc")
SAMPLED = TraceFlags(TraceFlags.SAMPLED)
UNSET, ERROR = StatusCode.UNSET.value, StatusCode.ERROR.value  # the same numbers in OTLP
HOSTNAME = "celery.worker.hostname"
Attributes = tuple[tuple[str, object], ...]
SpanEventData = tuple[int, str, Attributes]
"""A span event: time (ns), name and attributes."""
_RANGE64 = 1 << 64
_TIME = itemgetter(0)  # of a SpanEventData
_UNBEGUN = object()
"""``Task.trace`` until the task's first sent or received event: absent."""
_MASK64 = _RANGE64 - 1


class _Sampled:
    """The one part of a span the SDK's span processors read before queuing it."""

    trace_flags = SAMPLED


class TaskTrace:
    """One task's span, filled in by the hooks and handed on whole when the task ends.

    It is plain data: the SDK's span processors read only
    ``span.context.trace_flags.sampled`` before queuing a span, so a finished
    trace goes through the ``BatchSpanProcessor`` as it is. ``otlp`` encodes it
    directly; for other exporters ``ReadableSpanExporter`` makes SDK spans of
    it, in the export thread.

    The last delivery's received and started events are kept in slots, and
    span events are made of them only for export; earlier deliveries and
    retries, rare, go to ``history``. A span thus allocates nothing per event.
    """

    __slots__ = (
        "end",
        "error",
        "first_started",
        "history",
        "hostname",
        "name",
        "outcome",
        "parent_id",
        "parent_span_id",
        "queue",
        "received",
        "received_by",
        "retried",
        "retries",
        "root_id",
        "span_id",
        "start",
        "started",
        "started_by",
        "status",
        "trace_id",
        "uuid",
    )
    context = _Sampled

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
        self.received = self.started = 0  # of the last delivery, with their workers:
        self.received_by = self.started_by = ""
        self.first_started = 0
        self.retried = 0  # task-retried events seen
        self.retries = 0  # Celery's count, from the events of the redelivered task
        self.history: list[SpanEventData] | None = None
        self.error: Attributes = ()  # the exception of a failure
        # end, trace_id, span_id, parent_span_id (0: none), status and outcome
        # are set when the task ends, by Spans._emit.

    def shared_key(self) -> tuple[object, ...]:
        """What ``shared_attributes`` are made of: spans with equal keys share them."""
        return (self.queue, self.name, self.retries, self.retried, self.outcome, self.hostname)

    def shared_attributes(self) -> Attributes:
        """Attributes many spans share (task name, queue, worker, outcome): an encoder
        may encode them once per ``shared_key``."""
        shared: Attributes = (
            ("messaging.system", "celery"),
            ("messaging.operation.type", "process"),
            ("messaging.destination.name", self.queue),
            ("celery.task.name", self.name),
            ("celery.retries", max(self.retries, self.retried)),
            self.outcome,
        )
        if self.hostname is not None:
            shared += ((HOSTNAME, self.hostname),)
        return shared

    def own_attributes(self) -> Attributes:
        """Attributes of this task alone: its id and its times."""
        own: Attributes = (("messaging.message.id", self.uuid),)
        if self.first_started:
            own += (
                ("celery.queue_wait_seconds", max(0, self.first_started - self.start) / 1e9),
                ("celery.run_seconds", max(0, self.end - self.started) / 1e9),
            )
        return own

    def events(self) -> list[SpanEventData]:
        """The span's events in time order; built only for export."""
        events = list(self.history) if self.history else []
        if self.received:
            events.append((self.received, "received", ((HOSTNAME, self.received_by),)))
        if self.started:
            events.append((self.started, "started", ((HOSTNAME, self.started_by),)))
        if self.error:
            events.append((self.end, "exception", self.error))
        events.sort(key=_TIME)
        return events

    def remember(self, event: SpanEventData) -> None:
        """Keep an event that the slots do not hold."""
        if self.history is None:
            self.history = []
        self.history.append(event)


class Spans:
    """Builds a span per task from the tracker's hooks and hands it to a span processor."""

    def __init__(self, processor: SpanProcessor, sample_ratio: float = 1.0) -> None:
        self.processor = processor
        self.sample_ratio = sample_ratio
        self._threshold = int(sample_ratio * _RANGE64)

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
            end = max(
                state.received,
                state.started,
                state.start,
                *(event[0] for event in state.history or ()),
            )
            self._emit(task, state, end, (UNSET, ""), ("celery.incomplete", True))

    def close(self) -> None:
        """Export what is queued, then stop the export thread."""
        self.processor.shutdown()

    # Hooks, one per event type; the task record is there, its trace state may not be.

    def _begin(self, task: Task, event: Event) -> TaskTrace | None:
        """The span starts at the first task-sent or task-received, if its workflow is sampled."""
        state = getattr(task, "trace", _UNBEGUN)
        if state is not _UNBEGUN or task.done:  # begun, or a late event of a finished task
            return None if state is _UNBEGUN else state
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
            if received < state.start:
                state.start = received
            if state.received:  # a redelivery: the earlier one becomes history
                state.remember((state.received, "received", ((HOSTNAME, state.received_by),)))
            state.received, state.received_by = received, hostname

    def _on_started(self, task: Task, event: Event) -> None:
        state = getattr(task, "trace", None)
        if state is not None:
            hostname = state.hostname = event["hostname"]
            started = _ns(event["timestamp"])
            if state.started:
                state.remember((state.started, "started", ((HOSTNAME, state.started_by),)))
            else:
                state.first_started = started
            state.started, state.started_by = started, hostname

    def _on_retried(self, task: Task, event: Event) -> None:
        state = getattr(task, "trace", None)
        if state is not None:
            state.retried += 1
            attributes = (*_exception(event), ("celery.retries", state.retried))
            state.remember((_ns(event["timestamp"]), "retry", attributes))

    def _on_succeeded(self, task: Task, event: Event) -> None:
        self._end(task, event, (UNSET, ""), "SUCCESS")

    def _on_failed(self, task: Task, event: Event) -> None:
        state = getattr(task, "trace", None)
        if state is not None:
            attributes = state.error = _exception(event)
            status = (ERROR, f"{attributes[0][1]}: {attributes[1][1]}")
            self._end(task, event, status, "FAILURE")

    def _on_rejected(self, task: Task, event: Event) -> None:
        self._end(task, event, (UNSET, ""), "REJECTED")

    def _on_revoked(self, task: Task, event: Event) -> None:
        self._end(task, event, (UNSET, ""), "REVOKED")

    # Ending the span.

    def _end(self, task: Task, event: Event, status: tuple[int, str], state_name: str) -> None:
        state = getattr(task, "trace", None)
        if state is not None:
            state.hostname = event["hostname"]
            self._emit(task, state, _ns(event["timestamp"]), status, ("celery.state", state_name))

    def _emit(
        self,
        task: Task,
        state: TaskTrace,
        end: int,
        status: tuple[int, str],
        outcome: tuple[str, object],
    ) -> None:
        task.trace = None
        state.end = max(end, state.start)
        state.status, state.outcome = status, outcome
        state.name = state.name or task.name
        state.queue = state.queue or task.queue
        state.trace_id = _trace_id(state.root_id)
        state.span_id = _span_id(state.uuid)
        parent_id = state.parent_id
        state.parent_span_id = _span_id(parent_id) if parent_id and parent_id != state.uuid else 0
        self.processor.on_end(state)  # type: ignore[arg-type]  # see TaskTrace


def readable_span(
    trace: TaskTrace, resource: Resource, scope: InstrumentationScope
) -> ReadableSpan:
    """The SDK's form of a finished trace, for exporters other than ``otlp``'s."""
    context = SpanContext(trace.trace_id, trace.span_id, False, SAMPLED)
    parent = (
        SpanContext(trace.trace_id, trace.parent_span_id, True, SAMPLED)
        if trace.parent_span_id
        else None
    )
    code, message = trace.status
    return ReadableSpan(
        name=trace.name,
        context=context,
        parent=parent,
        resource=resource,
        attributes=dict(trace.shared_attributes() + trace.own_attributes()),
        kind=SpanKind.CONSUMER,
        events=[
            SpanEvent(name, dict(attributes), time) for time, name, attributes in trace.events()
        ],
        status=Status(StatusCode(code), message or None),
        start_time=trace.start,
        end_time=trace.end,
        instrumentation_scope=scope,
    )


class ReadableSpanExporter(SpanExporter):
    """Hands an SDK exporter (gRPC, or any other) SDK spans made from finished traces."""

    def __init__(
        self, exporter: SpanExporter, resource: Resource, scope: InstrumentationScope
    ) -> None:
        self.exporter = exporter
        self.resource = resource
        self.scope = scope

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        return self.exporter.export(
            [readable_span(trace, self.resource, self.scope) for trace in spans]
        )

    def shutdown(self) -> None:
        self.exporter.shutdown()


class HttpSpanExporter(SpanExporter):
    """OTLP/HTTP protobuf with ``otlp``'s encoder, many times cheaper than the SDK's."""

    def __init__(
        self, sender: otlp.HttpSender, resource: Resource, scope: InstrumentationScope
    ) -> None:
        self.sender = sender
        self.encoder = otlp.Encoder(resource.attributes, scope.name, scope.version)
        self._warned_at = -WARN_EVERY_SECONDS

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        try:
            self.sender.send(self.encoder.encode(spans))
        except otlp.ExportError as exc:
            now = time.monotonic()
            if now - self._warned_at >= WARN_EVERY_SECONDS:
                self._warned_at = now
                log.warning(
                    "could not export %d spans: %s; further failures are not logged for a minute",
                    len(spans),
                    exc,
                )
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.sender.close()


BATCH_DEFAULTS = (
    ("max_queue_size", "OTEL_BSP_MAX_QUEUE_SIZE", 16_384),
    ("max_export_batch_size", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 2_048),
)
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


def origin() -> tuple[Resource, InstrumentationScope]:
    """The resource and instrumentation scope every span is exported with."""
    resource = Resource.create({SERVICE_NAME: DEFAULT_SERVICE_NAME}).merge(
        OTELResourceDetector().detect()
    )  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win
    return resource, InstrumentationScope("celery-events-exporter", __version__)


def build(sample_ratio: float, environ: Mapping[str, str] | None = None) -> Spans:
    """Spans exported by OTLP as the standard OTEL_* environment variables say."""
    environ = os.environ if environ is None else environ
    resource, scope = origin()
    # The SDK's defaults (a 2,048-span queue, 512 a request) suit one process's own
    # spans; here every task of the cluster ends a span, thousands a second.
    sizes = {name: None if variable in environ else size for name, variable, size in BATCH_DEFAULTS}
    logging.getLogger(_QUEUE_FULL_LOGGER).addFilter(_QUEUE_FULL_ONCE_PER_MINUTE)
    processor = BatchSpanProcessor(_span_exporter(environ, resource, scope), **sizes)
    return Spans(processor, sample_ratio)


def _span_exporter(
    environ: Mapping[str, str], resource: Resource, scope: InstrumentationScope
) -> SpanExporter:
    variable = next(
        (
            name
            for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
            if environ.get(name)
        ),
        None,
    )
    protocol = environ[variable].strip().lower() if variable else PROTOCOLS[0]
    if protocol not in PROTOCOLS:
        raise ConfigError(
            f"otlp_traces: {variable}: expected one of {', '.join(PROTOCOLS)}, got {protocol!r}"
        )
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )
        except ImportError:
            raise ConfigError(
                f"otlp_traces: {variable}=grpc needs opentelemetry-exporter-otlp-proto-grpc: "
                "pip install opentelemetry-exporter-otlp-proto-grpc"
            ) from None
        return ReadableSpanExporter(GrpcSpanExporter(), resource, scope)
    try:
        sender = otlp.HttpSender(environ)
    except ValueError as exc:
        raise ConfigError(f"otlp_traces: {exc}") from None
    return HttpSpanExporter(sender, resource, scope)


def _count_retries(state: TaskTrace, event: Event) -> None:
    """Celery's own count: its events for the redelivered task may come before task-retried."""
    retries = event.get("retries")
    if type(retries) is int and retries > state.retries:
        state.retries = retries


def _exception(event: Event) -> Attributes:
    """The semantic-convention attributes of the exception a task-failed or -retried names:
    type, message and, when the event has one, the stack trace."""
    text = event.get("exception")
    text = text if isinstance(text, str) else ""
    attributes: Attributes = (
        ("exception.type", exception_class(text)),
        ("exception.message", _exception_message(text)),
    )
    traceback = event.get("traceback")
    if isinstance(traceback, str) and traceback:
        attributes += (("exception.stacktrace", traceback),)
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


def _uuid_value(text: str) -> int:
    """The 128 bits of a UUID in its usual form (what ``uuid.UUID(text).int`` gives, for
    less), else 0."""
    digits = text.replace("-", "")
    if len(digits) != 32 or len(text) != 36:
        return 0
    try:
        return int(digits, 16)
    except ValueError:
        return 0


def _trace_id(root_id: str) -> int:
    return _uuid_value(root_id) or int.from_bytes(
        blake2b(root_id.encode(), digest_size=16).digest()
    )


def _span_id(task_id: str) -> int:
    """The two halves of the uuid folded together: random for version 4 uuids, and
    distinct for time-based ones, whose low half is the same for a whole host."""
    value = _uuid_value(task_id)
    return ((value >> 64) ^ (value & _MASK64) if value else _hash64(task_id)) or 1


def _ns(timestamp: float) -> int:
    return int(timestamp * 1e9)
