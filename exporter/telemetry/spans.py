"""The spans of a task, in the shape of messaging, as plain data.

A task is published once and executed once or more (retries, redeliveries):

- ``task-sent`` is a ``PRODUCER`` span, ``send <task>``, of no duration,
  exported at once;
- each execution, ``task-started`` to the event that ends it (succeeded,
  failed, retried, rejected, revoked, or its worker lost), is a ``CONSUMER``
  span, ``process <task>``, a child of the publish. The queue wait is the gap
  between them. Retries are sibling executions under the one publish.
  Without sent events the executions have no producer above them.

``Publish`` and ``TaskTrace`` hold them; ``span_hooks`` fills them in from
the events, ``delivery`` sends them.
"""

from __future__ import annotations

from ..track.task import Event, exception_class
from . import otlp
from .otel import StatusCode, TraceFlags
from .sampling import Sampling, execution_span_id

SAMPLED = TraceFlags(TraceFlags.SAMPLED)
UNSET, ERROR = StatusCode.UNSET.value, StatusCode.ERROR.value  # the same numbers in OTLP
HOSTNAME = "celery.worker.hostname"
ERROR_TYPE = "error.type"
MAX_VALUE_LENGTH = 4096
"""Characters kept of a string attribute (an exception message, a task name) when
``OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT`` does not say."""
MAX_STACKTRACE_LENGTH = 32_768
"""Characters kept of a traceback: its start and its end, where the exception is."""
Attributes = tuple[tuple[str, object], ...]
SpanStatus = tuple[int, str]
"""A span's status: OTLP's code, and the description."""
Outcome = tuple[str, object]
"""The attribute that says how an execution ended."""
SpanEventData = tuple[int, str, Attributes]
"""A span event: time (ns), name and attributes."""
FINE = (UNSET, "")
SUCCESS, FAILURE, RETRY, REJECTED, REVOKED, INTERRUPTED = (
    ("celery.state", state)
    for state in ("SUCCESS", "FAILURE", "RETRY", "REJECTED", "REVOKED", "INTERRUPTED")
)
INCOMPLETE = ("celery.incomplete", True)


class _Sampled:
    """The one part of a span the SDK's span processors read before queuing it."""

    trace_flags = SAMPLED


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
    status = FINE

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
        self.span_id = execution_span_id(message_span_id, 0)
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
        following.span_id = execution_span_id(self.message_span_id, following.attempt)
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


def count_retries(state: TaskTrace, event: Event) -> None:
    """Celery's own count: its events for the redelivered task may come before task-retried."""
    retries = event.get("retries")
    if type(retries) is int and retries > state.retries:
        state.retries = retries


def exception_attributes(event: Event) -> Attributes:
    """The semantic-convention attributes of the exception a task-failed or -retried names:
    type (as Celery names it), message and, when the event has one, the stack trace."""
    text = event.get("exception")
    text = text if isinstance(text, str) else ""
    traceback = event.get("traceback")
    traceback = traceback if isinstance(traceback, str) else ""
    attributes: Attributes = (
        ("exception.type", cut(exception_class(text, traceback))),
        ("exception.message", cut(_exception_message(text))),
    )
    if traceback:
        attributes += (("exception.stacktrace", cut(traceback, MAX_STACKTRACE_LENGTH)),)
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


def cut(text: str, limit: int = MAX_VALUE_LENGTH) -> str:
    """At most ``limit`` characters: the start and the end, joined by an ellipsis."""
    if len(text) <= limit:
        return text
    half = (limit - 1) // 2
    return f"{text[:half]}…{text[len(text) - (limit - 1 - half) :]}"


def nanoseconds(timestamp: float) -> int:
    return int(timestamp * 1e9)
