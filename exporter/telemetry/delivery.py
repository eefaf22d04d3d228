"""Delivering finished spans: the span queue, the OTLP/HTTP and SDK exporters behind
it, their retries, and the counts of what became of each span.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from .. import __version__
from ..config import ConfigError
from ..logs import Throttle
from ..parsers import integer
from . import otlp
from .metrics import Counter
from .otel import (
    SERVICE_NAME,
    InstrumentationScope,
    OTELResourceDetector,
    ReadableSpan,
    Resource,
    SpanContext,
    SpanEvent,
    SpanExporter,
    SpanExportResult,
    SpanKind,
    Status,
    StatusCode,
    TraceState,
)
from .spans import SAMPLED, Publish, TaskTrace

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "celery"
PROTOCOLS = ("http/protobuf", "grpc")
OUTCOMES = ("exported", "dropped", "retried")
"""``celery_exporter_spans_total`` outcomes."""


def readable_span(
    trace: TaskTrace | Publish, resource: Resource, scope: InstrumentationScope
) -> ReadableSpan:
    """The SDK's form of a finished span, for exporters other than ``otlp``'s."""
    state = TraceState.from_header([trace.trace_state]) if trace.trace_state else None
    context = SpanContext(trace.trace_id, trace.span_id, False, SAMPLED, state)
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
        kind=SpanKind.PRODUCER if trace.kind == otlp.KIND_PRODUCER else SpanKind.CONSUMER,
        events=[
            SpanEvent(name, dict(attributes), time) for time, name, attributes in trace.events()
        ],
        status=Status(StatusCode(code), message or None),
        start_time=trace.start,
        end_time=trace.end,
        instrumentation_scope=scope,
    )


class SpanCounts:
    """``celery_exporter_spans_total``, counted by the export thread and, for spans a
    full queue drops, by the receiving thread: hence the lock."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self._lock = threading.Lock()
        for outcome in OUTCOMES:
            counter.inc((outcome,), 0)

    def add(self, outcome: str, count: int) -> None:
        with self._lock:
            self.counter.inc((outcome,), count)


class ReadableSpanExporter(SpanExporter):
    """Hands an SDK exporter (gRPC, or any other) SDK spans made from finished traces;
    that exporter retries as it does."""

    def __init__(
        self,
        exporter: SpanExporter,
        resource: Resource,
        scope: InstrumentationScope,
        counts: SpanCounts | None = None,
    ) -> None:
        self.exporter = exporter
        self.resource = resource
        self.scope = scope
        self.counts = counts

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        result = self.exporter.export(
            [readable_span(trace, self.resource, self.scope) for trace in spans]
        )
        if self.counts is not None:
            ok = result is SpanExportResult.SUCCESS
            self.counts.add("exported" if ok else "dropped", len(spans))
        return result

    def prepare(self, spans: list[Any]) -> list[Any]:
        """SDK spans are made on the export thread, in ``send``."""
        return spans

    def send(self, batch: list[Any], size: int) -> None:
        self.export(batch)

    def stopping(self) -> None:
        """The SDK's exporter bounds its own retries."""

    def shutdown(self) -> None:
        self.exporter.shutdown()


class HttpSpanExporter:
    """OTLP/HTTP protobuf with ``otlp``'s encoder, many times cheaper than the SDK's."""

    def __init__(
        self,
        sender: otlp.HttpSender,
        resource: Resource,
        scope: InstrumentationScope,
        counts: SpanCounts,
    ) -> None:
        self.sender = sender
        self.encoder = otlp.Encoder(resource.attributes, scope.name, scope.version)
        self.counts = counts
        self._throttle = Throttle()

    def prepare(self, spans: list[Any]) -> bytes:
        """The request's body, made on the thread that ended the batch's last span."""
        return self.encoder.encode(spans)

    def send(self, body: bytes, size: int) -> None:
        try:
            delivery = self.sender.send(body)
        except otlp.ExportError as exc:
            self.counts.add("retried", size * exc.retries)
            self.counts.add("dropped", size)
            self._warn("could not export %d spans: %s", size, exc)
            return
        rejected = min(size, delivery.rejected)
        self.counts.add("retried", size * delivery.retries)
        self.counts.add("exported", size - rejected)
        if rejected or delivery.message:
            self.counts.add("dropped", rejected)
            self._warn(
                "the collector rejected %d of %d spans: %s", rejected, size, delivery.message
            )

    def _warn(self, message: str, *args: object) -> None:
        """Log at most once a minute: a collector that is down fails every batch."""
        if self._throttle.due():
            log.warning(message + "; further failures are not logged for a minute", *args)

    def stopping(self) -> None:
        """The daemon stops: what is queued goes once, with no waiting to retry."""
        self.sender.stopping.set()

    def shutdown(self) -> None:
        self.sender.close()


class BatchExporter(Protocol):
    """What ``SpanQueue`` hands batches of spans to."""

    def prepare(self, spans: list[Any]) -> Any:
        """A batch made ready to send (encoded, for OTLP/HTTP)."""

    def send(self, batch: Any, size: int) -> None:
        """Send a prepared batch of ``size`` spans and count them; never raises for
        a collector's failure."""

    def stopping(self) -> None:
        """The daemon stops: what is queued goes once, with no waiting to retry."""

    def shutdown(self) -> None: ...


BATCH_SETTINGS = (
    ("OTEL_BSP_SCHEDULE_DELAY", 5_000),
    ("OTEL_BSP_MAX_QUEUE_SIZE", 16_384),
    ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 2_048),
)
"""The SDK's batching variables and their defaults here: a batch is sent at least every
5 s; the SDK's queue (2,048 spans, 512 a request) suits one process's own spans, but
here every task of the cluster ends a span, thousands a second. A quarter of a second of
spans at 60,000 tasks a second, some 50 MB at most."""
STOP_SECONDS = 30.0
"""How long a stop waits for the last batches to go."""


class SpanQueue:
    """Finished spans, batched for an exporter as the SDK's ``BatchSpanProcessor``
    batches them, with two differences.

    A full batch is prepared (encoded, for OTLP/HTTP) by the thread that ends its
    last span, and the export thread only sends, waiting on the network. Encoding
    on the export thread cost more: the two threads traded the GIL, and each
    other's caches, every few milliseconds (the traced CPU fell by a tenth when
    it moved). A partial batch is prepared by the export thread once it has
    waited the schedule delay.

    A span that finds the queue full is dropped and counted, and logged once a
    minute: the SDK logs each one, costing more than the spans just when the
    collector is behind, and counts none.
    """

    def __init__(
        self,
        exporter: BatchExporter,
        counts: SpanCounts,
        *,
        schedule_delay_ms: int,
        max_queue_size: int,
        max_export_batch_size: int,
    ) -> None:
        self.exporter = exporter
        self.counts = counts
        self._delay = schedule_delay_ms / 1000
        self._limit = max_queue_size
        self._batch_size = max_export_batch_size
        self._spans: deque[Any] = deque()  # appended by one thread, taken under _taking
        self._batches: deque[tuple[Any, int]] = deque()  # prepared, with their sizes
        self._taking = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._throttle = Throttle()
        self._thread = threading.Thread(target=self._run, name="span-export", daemon=True)
        self._thread.start()

    def queued(self) -> int:
        """Spans waiting, as they are or prepared (full batches counted whole): the
        queue's bound."""
        return len(self._spans) + len(self._batches) * self._batch_size

    def on_end(self, span: Any) -> None:
        if self.queued() >= self._limit:
            self._drop()
            return
        spans = self._spans
        spans.append(span)
        if len(spans) >= self._batch_size:
            self._prepare(self._batch_size)
            self._wake.set()

    def shutdown(self) -> None:
        """Send what is queued, once each, then stop the export thread."""
        self.exporter.stopping()
        self._stopping = True
        self._wake.set()
        self._thread.join(STOP_SECONDS)
        self.exporter.shutdown()

    def _prepare(self, count: int) -> None:
        with self._taking:
            popleft = self._spans.popleft
            batch = [popleft() for _ in range(min(count, len(self._spans)))]
        if not batch:
            return
        try:
            prepared = self.exporter.prepare(batch)
        except Exception:  # a bug must cost one batch, counted, never the events
            log.exception("could not encode %d spans", len(batch))
            self.counts.add("dropped", len(batch))
            return
        self._batches.append((prepared, len(batch)))

    def _run(self) -> None:
        while not self._stopping:
            if not self._wake.wait(self._delay):
                self._prepare(self._batch_size)  # spans that waited a whole delay
            self._wake.clear()
            self._send()
        while self._spans:
            self._prepare(self._batch_size)
        self._send()

    def _send(self) -> None:
        batches = self._batches
        while batches:
            batch, size = batches.popleft()
            try:
                self.exporter.send(batch, size)
            except Exception:  # a bug must cost one batch, never the export thread
                log.exception("could not export %d spans", size)
                self.counts.add("dropped", size)

    def _drop(self) -> None:
        self.counts.add("dropped", 1)
        if self._throttle.due():
            log.warning(
                "the span queue is full (%d spans): spans are dropped; not logged again "
                "for a minute",
                self._limit,
            )


def origin() -> tuple[Resource, InstrumentationScope]:
    """The resource and instrumentation scope every span is exported with."""
    resource = Resource.create({SERVICE_NAME: DEFAULT_SERVICE_NAME}).merge(
        OTELResourceDetector().detect()
    )  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win
    return resource, InstrumentationScope("celery-events-exporter", __version__)


def batch_setting(environ: Mapping[str, str], variable: str, default: int) -> int:
    text = environ.get(variable, "").strip()
    if not text:
        return default
    try:
        return integer(1)(text)
    except ValueError as exc:
        raise ConfigError(f"otlp_traces: {variable}: {exc}") from None


def span_exporter(
    environ: Mapping[str, str],
    resource: Resource,
    scope: InstrumentationScope,
    counts: SpanCounts,
) -> BatchExporter:
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
    try:
        timeout = otlp.timeout_seconds(environ)
        otlp.compression(environ)
        if protocol == "http/protobuf":
            return HttpSpanExporter(otlp.HttpSender(environ), resource, scope, counts)
    except ValueError as exc:
        raise ConfigError(f"otlp_traces: {exc}") from None
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )
    except ImportError:
        raise ConfigError(
            f"otlp_traces: {variable}=grpc needs opentelemetry-exporter-otlp-proto-grpc: "
            "pip install opentelemetry-exporter-otlp-proto-grpc"
        ) from None
    # The SDK reads OTEL_EXPORTER_OTLP_TIMEOUT in seconds; given here, it is in
    # milliseconds as over HTTP: the time a batch may take, retries included.
    return ReadableSpanExporter(GrpcSpanExporter(timeout=timeout), resource, scope, counts)
