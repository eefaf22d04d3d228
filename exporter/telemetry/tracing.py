"""OpenTelemetry traces rebuilt from the event stream, in the shape of messaging.

A task is published once and executed once or more (retries, redeliveries):

- ``task-sent`` is a ``PRODUCER`` span, ``send <task>``, of no duration,
  exported at once;
- each execution, ``task-started`` to the event that ends it (succeeded,
  failed, retried, rejected, revoked, or its worker lost), is a ``CONSUMER``
  span, ``process <task>``, a child of the publish. The queue wait is the gap
  between them. Retries are sibling executions under the one publish.
  Without sent events the executions have no producer above them. The
  publisher sends ``task-sent`` after the message, so the worker's events
  can come first: a publish that arrives while the execution runs still
  becomes its parent; one that arrives after it ended is its sibling.

A task that a workflow's task published hangs below the execution that
published it. The state of the execution in progress lives in the tracker's
task record (``Task.trace``), so the task table's bound also bounds open spans.

Ids are derived, never generated, so that spans ending at different times,
or exported by two replicas, meet in one trace and find their parents:

- trace id: the 128-bit value of the workflow's ``root_id`` (the task's
  own uuid when it has none), or the first 128 bits of its BLAKE2b hash
  when the id is not a UUID;
- the publish's span id: the task's uuid with its two 64-bit halves XORed
  together (the first 64 bits of its BLAKE2b hash when it is not a UUID);
  the n-th execution's: that, XORed with n times a 64-bit odd constant;
- sampling: the trace id's low 56 bits against the threshold of the
  OpenTelemetry probability sampling specification, so a workflow is kept
  or dropped whole by every replica, and the threshold is recorded.

This is the only module that imports OpenTelemetry, and the daemon imports
it only when traces are on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from hashlib import blake2b
from typing import Any, Protocol

from .. import __version__
from ..config import ConfigError, integer
from ..logs import Throttle
from ..track.tracker import Event, Hook, Task, exception_class
from . import otlp
from .metrics import Counter, Exemplars, Metrics

try:
    from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import Event as SpanEvent
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import (
        SpanContext,
        SpanKind,
        Status,
        StatusCode,
        TraceFlags,
        TraceState,
    )
except ImportError as exc:
    raise ConfigError(
        f"otlp_traces: needs the OpenTelemetry packages ({exc.name} is missing): "
        "pip install 'celery-events-exporter[tracing]'"
    ) from None

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "celery"
PROTOCOLS = ("http/protobuf", "grpc")
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
SAMPLED = TraceFlags(TraceFlags.SAMPLED)
UNSET, ERROR = StatusCode.UNSET.value, StatusCode.ERROR.value  # the same numbers in OTLP
HOSTNAME = "celery.worker.hostname"
ERROR_TYPE = "error.type"
OUTCOMES = ("exported", "dropped", "retried")
"""``celery_exporter_spans_total`` outcomes."""
MAX_VALUE_LENGTH = 4096
"""Characters kept of a string attribute (an exception message, a task name) when
``OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT`` does not say."""
MAX_STACKTRACE_LENGTH = 32_768
"""Characters kept of a traceback: its start and its end, where the exception is."""
RECENT_RETRIED = 10_000
"""Tasks run more than once whose execution count is kept for their children's parent."""
Attributes = tuple[tuple[str, object], ...]
SpanStatus = tuple[int, str]
"""A span's status: OTLP's code, and the description."""
Outcome = tuple[str, object]
"""The attribute that says how an execution ended."""
SpanEventData = tuple[int, str, Attributes]
"""A span event: time (ns), name and attributes."""
_RANGE56 = 1 << 56
_MASK56 = _RANGE56 - 1
_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15
"""Odd: n times it differs for every n below 2**64, so executions' span ids differ."""
_FINE = (UNSET, "")
SUCCESS, FAILURE, RETRY, REJECTED, REVOKED, INTERRUPTED = (
    ("celery.state", state)
    for state in ("SUCCESS", "FAILURE", "RETRY", "REJECTED", "REVOKED", "INTERRUPTED")
)
INCOMPLETE = ("celery.incomplete", True)
_UNTRACED = False
"""``Task.trace`` of a task whose workflow is not sampled, or whose last execution
ended: falsy, as None (not seen yet) is, so that a hook tests ``not state`` once."""


class _Sampled:
    """The one part of a span the SDK's span processors read before queuing it."""

    trace_flags = SAMPLED


class Sampling:
    """A sampling probability as the OpenTelemetry probability sampling specification
    records it: a rejection threshold on the trace id's low 56 bits (``ot=th:`` in the
    W3C trace state) and, for backends that read it, ``SampleRate`` (1 in N)."""

    def __init__(self, ratio: float) -> None:
        self.threshold = min(_RANGE56, max(0, round((1.0 - ratio) * _RANGE56)))
        self.everything = self.threshold == 0
        self.nothing = self.threshold == _RANGE56
        if self.everything or self.nothing:
            self.trace_state, self.attributes = "", ()
        else:
            digits = f"{self.threshold:014x}".rstrip("0")
            self.trace_state = f"ot=th:{digits}"
            rate = max(1, round(_RANGE56 / (_RANGE56 - self.threshold)))
            self.attributes = (("SampleRate", rate),)

    def keeps(self, trace_id: int) -> bool:
        return self.everything or (not self.nothing and trace_id & _MASK56 >= self.threshold)


class Publish:
    """A task's publish (``task-sent``): a producer span of no duration, sent at once."""

    __slots__ = (
        "end",
        "parent_span_id",
        "queue",
        "sampling",
        "span_id",
        "start",
        "task_name",
        "trace_id",
        "trace_state",
        "uuid",
    )
    kind = otlp.KIND_PRODUCER
    context = _Sampled
    status = _FINE

    def __init__(self, execution: TaskTrace, parent_span_id: int, at: int) -> None:
        self.uuid = execution.uuid
        self.trace_id = execution.trace_id
        self.span_id = execution.message_span_id
        self.parent_span_id = parent_span_id
        self.task_name = execution.task_name
        self.queue = execution.queue
        self.sampling = execution.sampling
        self.trace_state = self.sampling.trace_state
        self.start = self.end = at

    @property
    def name(self) -> str:
        return f"send {self.task_name}"

    def shared_key(self) -> tuple[object, ...]:
        return (otlp.KIND_PRODUCER, self.task_name, self.queue, self.sampling)

    def shared_attributes(self) -> Attributes:
        return (
            ("messaging.system", "celery"),
            ("messaging.operation.name", "send"),
            ("messaging.operation.type", "send"),
            ("messaging.destination.name", self.queue),
            ("celery.task.name", self.task_name),
            *self.sampling.attributes,
        )

    def own_attributes(self) -> Attributes:
        return (("messaging.message.id", self.uuid),)

    def events(self) -> list[SpanEventData]:
        return []


class TaskTrace:
    """One execution of a task, filled in by the hooks and handed on whole when it ends.

    It is plain data, queued as it is by ``SpanQueue`` (or by an SDK span
    processor, which reads only ``span.context.trace_flags.sampled``). ``otlp``
    encodes it directly; for other exporters ``ReadableSpanExporter`` makes SDK
    spans of it, in the export thread. It allocates nothing per event.
    """

    __slots__ = (
        "attempt",
        "end",
        "error",
        "error_type",
        "hostname",
        "message_span_id",
        "next_retries",
        "outcome",
        "parent_span_id",
        "pending",
        "queue",
        "queue_wait",
        "retries",
        "sampling",
        "span_id",
        "start",
        "status",
        "task_name",
        "trace_id",
        "trace_state",
        "uuid",
    )
    kind = otlp.KIND_CONSUMER
    context = _Sampled

    def __init__(self, uuid: str, trace_id: int, message_span_id: int, sampling: Sampling) -> None:
        self.uuid = uuid
        self.trace_id = trace_id
        self.sampling = sampling
        self.trace_state = sampling.trace_state
        self.message_span_id = message_span_id
        self.parent_span_id = 0
        self.attempt = 0
        self.span_id = _execution_span_id(message_span_id, 0)
        self.task_name: str | None = None
        self.queue: str | None = None
        self.hostname: str | None = None
        self.start = 0  # task-started of this execution, ns; 0 until then
        self.queue_wait = -1.0  # seconds from ready (sent or ETA, else received) to started
        self.retries = 0  # Celery's count of the task's retries, for this execution
        self.next_retries = 0  # the same, of a delivery received while this one runs
        self.error: Attributes = ()  # the exception this execution ended with
        self.error_type = ""
        self.pending: TaskTrace | None = None  # the last execution, until its end arrives
        # end, status and outcome are set when the execution ends, by Spans._emit.

    def next_attempt(self, retried: bool) -> TaskTrace:
        """The record of the task's next execution: the same task, a new span."""
        following = TaskTrace.__new__(TaskTrace)
        for slot in ("uuid", "trace_id", "sampling", "trace_state", "message_span_id"):
            setattr(following, slot, getattr(self, slot))
        for slot in ("parent_span_id", "task_name", "queue", "hostname"):
            setattr(following, slot, getattr(self, slot))
        following.retries = max(self.next_retries, self.retries + retried)
        following.next_retries = 0
        following.attempt = self.attempt + 1
        following.span_id = _execution_span_id(self.message_span_id, following.attempt)
        following.start, following.queue_wait = 0, -1.0
        following.error, following.error_type = (), ""
        following.pending = None
        return following

    @property
    def name(self) -> str:
        """Read only for a shared key the encoder has not met, and for SDK spans."""
        return f"process {self.task_name}"

    def shared_key(self) -> tuple[object, ...]:
        """What the name and ``shared_attributes`` are made of: spans with equal keys
        share them."""
        return (
            self.queue,
            self.task_name,
            self.retries,
            self.outcome,
            self.hostname,
            self.error_type,
            self.sampling,
        )

    def shared_attributes(self) -> Attributes:
        """Attributes many spans share (task name, queue, worker, outcome): an encoder
        may encode them once per ``shared_key``."""
        shared: Attributes = (
            ("messaging.system", "celery"),
            ("messaging.operation.name", "process"),
            ("messaging.operation.type", "process"),
            ("messaging.destination.name", self.queue),
            ("celery.task.name", self.task_name),
            ("celery.retries", self.retries),
            self.outcome,
            *self.sampling.attributes,
        )
        if self.hostname is not None:
            shared += ((HOSTNAME, self.hostname),)
        if self.error_type:
            shared += ((ERROR_TYPE, self.error_type),)
        return shared

    def own_attributes(self) -> Attributes:
        """Attributes of this execution alone: its task's id and queue wait."""
        own: Attributes = (("messaging.message.id", self.uuid),)
        if self.queue_wait >= 0.0:
            own += (("celery.queue_wait_seconds", self.queue_wait),)
        return own

    def events(self) -> list[SpanEventData]:
        """The exception the execution ended with, if any; built only for export."""
        return [(self.end, "exception", self.error)] if self.error else []


class Spans:
    """Builds the spans of tasks from the tracker's hooks and hands them to a span processor."""

    def __init__(
        self,
        processor: SpanQueue | SpanProcessor,
        sample_ratio: float = 1.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.processor = processor
        self.sampling = Sampling(sample_ratio)
        self._attempts: OrderedDict[str, int] = OrderedDict()
        """Executions before the current one, of tasks that ran more than once."""
        self._runtime: Exemplars | None = None
        self._queue_wait: Exemplars | None = None
        if metrics is not None:
            self._runtime = metrics.exemplars_of("celery_task_runtime_seconds")
            self._queue_wait = metrics.exemplars_of("celery_task_queue_wait_seconds")

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
        """End a started execution where it started, marked incomplete, rather than leak it."""
        state = task.trace
        if state and state.start:
            task.trace = _UNTRACED
            self._emit(task, state, state.start, _FINE, INCOMPLETE)

    def interrupted(self, task: Task, hostname: str) -> None:
        """The worker running the task was lost: end its execution span with an error."""
        state = task.trace
        if state and state.start:
            state.error_type = "WorkerLost"
            status = (ERROR, _cut(f"worker lost: {hostname}"))
            self._emit(task, state, time.time_ns(), status, INTERRUPTED)
            task.trace = self._next(state, retried=False)

    def close(self) -> None:
        """Export what is queued, then stop the export thread."""
        self.processor.shutdown()

    # Hooks, one per event type; the task record is there, its trace state may not be.

    def _begin(self, task: Task, event: Event) -> TaskTrace | None:
        """The task's trace state from its first task-sent or task-received, if its
        workflow is sampled; None for an unsampled one, or a late event of a finished task."""
        state = None if task.done else self._trace(event)
        task.trace = state or _UNTRACED
        return state

    def _trace(self, event: Event) -> TaskTrace | None:
        """A trace state made from a task-sent or task-received, if its workflow is sampled."""
        uuid = event["uuid"]
        value = _uuid_value(uuid)  # parsed once: most tasks are their workflow's root
        root_id = event.get("root_id")
        if root_id == uuid or not isinstance(root_id, str) or not root_id:
            trace_id = value or _hash128(uuid)
        else:
            trace_id = _trace_id(root_id)
        if not self.sampling.keeps(trace_id):
            return None
        state = TaskTrace(uuid, trace_id, _fold(uuid, value), self.sampling)
        name = event.get("name")
        if isinstance(name, str) and name:
            state.task_name = _cut(name)
        parent_id = event.get("parent_id")
        if isinstance(parent_id, str) and parent_id and parent_id != uuid:
            state.parent_span_id = _execution_span_id(
                _span_id(parent_id), self._attempts.get(parent_id, 0)
            )
        _count_retries(state, event)
        return state

    def _on_sent(self, task: Task, event: Event) -> None:
        state = task.trace
        if state is None:
            state = self._begin(task, event)
        elif event.get("retries"):
            return  # a retry's publish: its executions stay under the first publish
        elif state is _UNTRACED:  # unsampled, or ended before its publish arrived:
            state = self._trace(event)  # the publish goes beside the exported execution
        elif state.parent_span_id == state.message_span_id:
            return  # published already
        if state is not None:
            queue = event.get("queue")
            state.queue = _cut(queue) if isinstance(queue, str) and queue else task.queue
            state.task_name = state.task_name or task.name
            publish = Publish(state, state.parent_span_id, _ns(event["timestamp"]))
            state.parent_span_id = state.message_span_id  # executions hang below the publish
            self.processor.on_end(publish)  # type: ignore[arg-type]  # see TaskTrace

    def _on_received(self, task: Task, event: Event) -> None:
        state = task.trace
        if state is None:  # the commonest case: named and counted by _trace
            state = self._begin(task, event)
            if state is not None:
                state.hostname = event["hostname"]
            return
        if not state:
            return
        if state.start:  # the next delivery (a retry's), while this execution runs
            retries = event.get("retries")
            if type(retries) is int and retries > state.next_retries:
                state.next_retries = retries
            return
        state.hostname = event["hostname"]
        if state.task_name is None and isinstance(event.get("name"), str):
            state.task_name = _cut(event["name"])
        _count_retries(state, event)

    def _on_started(self, task: Task, event: Event) -> None:
        state = task.trace
        if not state:
            return
        if state.start:  # the last execution has not ended: its task-retried may be late
            following = task.trace = self._next(state, retried=False)
            following.pending, state = state, following
        state.hostname = event["hostname"]
        timestamp = event["timestamp"]
        state.start = _ns(timestamp)
        sent = task.sent
        ready = max(sent, task.eta or 0.0) if sent is not None else task.received
        if ready is not None:
            wait = state.queue_wait = max(0.0, timestamp - ready)
            if sent is not None and self._queue_wait is not None:  # as the tracker observed
                key = (task.name, task.queue)
                self._queue_wait.put(key, wait, state.trace_id, state.span_id, timestamp)

    def _on_retried(self, task: Task, event: Event) -> None:
        state = task.trace
        if not state:
            return
        # The worker sends task-retried when the pool reports the retry; by then the
        # retry's own delivery may have started: the retry ends the execution before,
        # by the time the next one began.
        pending = state.pending
        if pending is not None:
            state.pending = None
            pending.error = _exception(event)
            pending.hostname = event["hostname"]
            self._emit(task, pending, min(_ns(event["timestamp"]), state.start), _FINE, RETRY)
        elif state.start:
            state.error = _exception(event)
            self._end(task, state, event, _FINE, RETRY)
            task.trace = self._next(state, retried=True)

    def _on_succeeded(self, task: Task, event: Event) -> None:
        state = task.trace
        if state:  # the commonest end: _end, inlined
            timestamp = event["timestamp"]
            if self._runtime is not None and state.start:
                runtime, key = max(0.0, event["runtime"]), (task.name, task.queue)
                self._runtime.put(key, runtime, state.trace_id, state.span_id, timestamp)
            task.trace = _UNTRACED
            state.hostname = event["hostname"]
            self._emit(task, state, _ns(timestamp), _FINE, SUCCESS)

    def _on_failed(self, task: Task, event: Event) -> None:
        state = task.trace
        if state:
            state.error = _exception(event)
            state.error_type = str(state.error[0][1])
            status = (ERROR, str(state.error[1][1]))
            self._end(task, state, event, status, FAILURE, final=True)

    def _on_rejected(self, task: Task, event: Event) -> None:
        state = task.trace
        if state:
            self._end(task, state, event, _FINE, REJECTED, final=True)

    def _on_revoked(self, task: Task, event: Event) -> None:
        state = task.trace
        if state:
            self._end(task, state, event, _FINE, REVOKED, final=True)

    # Ending an execution.

    def _end(
        self,
        task: Task,
        state: TaskTrace,
        event: Event,
        status: SpanStatus,
        outcome: Outcome,
        final: bool = False,
    ) -> None:
        """End an execution at the event; a final one ends the task's trace state."""
        if final:
            task.trace = _UNTRACED
        state.hostname = event["hostname"]
        self._emit(task, state, _ns(event["timestamp"]), status, outcome)

    def _next(self, state: TaskTrace, retried: bool) -> TaskTrace:
        """The next execution's record; its count is kept for tasks it may publish."""
        following = state.next_attempt(retried)
        attempts = self._attempts
        attempts[state.uuid] = following.attempt
        attempts.move_to_end(state.uuid)
        if len(attempts) > RECENT_RETRIED:
            attempts.popitem(last=False)
        return following

    def _emit(
        self, task: Task, state: TaskTrace, end: int, status: SpanStatus, outcome: Outcome
    ) -> None:
        """Hand a finished execution over; one that never started (revoked or rejected
        before it ran) is a span of no duration where it ended.

        An earlier execution whose end never came (its task-retried may come after
        the task's final event) ends where this one began: retried, when Celery
        counts this delivery as a retry of it; else incomplete, where it started.
        """
        pending = state.pending
        if pending is not None:
            state.pending = None
            if state.retries > pending.retries:
                self._emit(task, pending, state.start, _FINE, RETRY)
            else:
                self._emit(task, pending, pending.start, _FINE, INCOMPLETE)
        state.start = state.start or end
        state.end = max(end, state.start)
        state.status, state.outcome = status, outcome
        state.task_name = state.task_name or task.name
        state.queue = state.queue or task.queue
        self.processor.on_end(state)  # type: ignore[arg-type]  # see TaskTrace


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


def build(
    metrics: Metrics, sample_ratio: float = 1.0, environ: Mapping[str, str] | None = None
) -> Spans:
    """Spans exported by OTLP as the standard OTEL_* environment variables say, counted
    in ``metrics``, whose run time and queue wait histograms get exemplars."""
    environ = os.environ if environ is None else environ
    ratio = sampler_ratio(environ, sample_ratio)
    resource, scope = origin()
    counts = SpanCounts(metrics.counter("celery_exporter_spans_total"))
    exporter = _span_exporter(environ, resource, scope, counts)
    delay, queue_size, batch_size = (
        _batch_setting(environ, variable, default) for variable, default in BATCH_SETTINGS
    )
    if batch_size > queue_size:
        raise ConfigError(
            f"otlp_traces: OTEL_BSP_MAX_EXPORT_BATCH_SIZE ({batch_size}) must not exceed "
            f"OTEL_BSP_MAX_QUEUE_SIZE ({queue_size})"
        )
    processor = SpanQueue(
        exporter,
        counts,
        schedule_delay_ms=delay,
        max_queue_size=queue_size,
        max_export_batch_size=batch_size,
    )
    return Spans(processor, ratio, metrics)


def _batch_setting(environ: Mapping[str, str], variable: str, default: int) -> int:
    text = environ.get(variable, "").strip()
    if not text:
        return default
    try:
        return integer(1)(text)
    except ValueError as exc:
        raise ConfigError(f"otlp_traces: {variable}: {exc}") from None


def sampler_ratio(environ: Mapping[str, str], option: float) -> float:
    """The share of workflows kept: ``OTEL_TRACES_SAMPLER`` (and ``_ARG``) when set, else
    ``trace_sample_ratio``. A parent-based sampler is the same as its root's: the root
    task decides for its whole workflow."""
    text = environ.get("OTEL_TRACES_SAMPLER", "").strip()
    if not text:
        return option
    name = text.lower()
    if name not in SAMPLERS:
        raise ConfigError(
            f"otlp_traces: OTEL_TRACES_SAMPLER: expected one of {', '.join(SAMPLERS)}, got {text!r}"
        )
    if option != 1.0:
        raise ConfigError(
            "trace_sample_ratio: set it or OTEL_TRACES_SAMPLER, not both "
            f"(OTEL_TRACES_SAMPLER={text})"
        )
    base = name.removeprefix("parentbased_")
    if base != "traceidratio":
        return 1.0 if base == "always_on" else 0.0
    argument = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    try:
        ratio = float(argument) if argument else 1.0
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(
            f"otlp_traces: OTEL_TRACES_SAMPLER_ARG: expected a ratio from 0 to 1, got {argument!r}"
        )
    return ratio


def _span_exporter(
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


def _count_retries(state: TaskTrace, event: Event) -> None:
    """Celery's own count: its events for the redelivered task may come before task-retried."""
    retries = event.get("retries")
    if type(retries) is int and retries > state.retries:
        state.retries = retries


def _exception(event: Event) -> Attributes:
    """The semantic-convention attributes of the exception a task-failed or -retried names:
    type (as Celery names it), message and, when the event has one, the stack trace."""
    text = event.get("exception")
    text = text if isinstance(text, str) else ""
    traceback = event.get("traceback")
    traceback = traceback if isinstance(traceback, str) else ""
    attributes: Attributes = (
        ("exception.type", _cut(exception_class(text, traceback))),
        ("exception.message", _cut(_exception_message(text))),
    )
    if traceback:
        attributes += (("exception.stacktrace", _cut(traceback, MAX_STACKTRACE_LENGTH)),)
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


def _cut(text: str, limit: int = MAX_VALUE_LENGTH) -> str:
    """At most ``limit`` characters: the start and the end, joined by an ellipsis."""
    if len(text) <= limit:
        return text
    half = (limit - 1) // 2
    return f"{text[:half]}…{text[len(text) - (limit - 1 - half) :]}"


def _hash64(text: str) -> int:
    return int.from_bytes(blake2b(_id_bytes(text), digest_size=8).digest())


def _id_bytes(text: str) -> bytes:
    """An id's bytes to hash; a lone surrogate in it passes as it is."""
    return text.encode("utf-8", "surrogatepass")


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
    return _uuid_value(root_id) or _hash128(root_id)


def _hash128(text: str) -> int:
    return int.from_bytes(blake2b(_id_bytes(text), digest_size=16).digest())


def _span_id(task_id: str) -> int:
    return _fold(task_id, _uuid_value(task_id))


def _fold(task_id: str, value: int) -> int:
    """The task's span id from its uuid's ``value``: the two halves folded together,
    random for version 4 uuids, and distinct for time-based ones, whose low half is
    the same for a whole host."""
    return ((value >> 64) ^ (value & _MASK64) if value else _hash64(task_id)) or 1


def _execution_span_id(message_span_id: int, attempt: int) -> int:
    """The span id of a task's execution number ``attempt`` (from 0)."""
    return (message_span_id ^ ((attempt + 1) * _GOLDEN64 & _MASK64)) or 1


def _ns(timestamp: float) -> int:
    return int(timestamp * 1e9)
