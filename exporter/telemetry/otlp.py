"""OTLP/HTTP protobuf for the spans ``span_hooks`` builds: encoding and sending.

The SDK's generic encoder builds a protobuf object per field and costs
tens of microseconds a span, more than the rest of a task's events
together. These spans have one shape (attributes, events, status, a
parent, a trace state; no links), so they are written to the wire format
directly, with the attributes that repeat (task names, queues, hosts,
outcomes) encoded once. Only the standard library is used; ``delivery``'s
``HttpSpanExporter`` hands this the batches of its span queue.

The destination follows the standard environment variables:
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (else ``OTEL_EXPORTER_OTLP_ENDPOINT``
plus ``/v1/traces``), and the ``_HEADERS``, ``_TIMEOUT`` (milliseconds),
``_COMPRESSION`` (``gzip`` or ``none``), ``_CERTIFICATE``, ``_CLIENT_CERTIFICATE`` and
``_CLIENT_KEY`` variables, the ``_TRACES_`` form first.
"""

from __future__ import annotations

import gzip
import http.client
import random
import ssl
import struct
import threading
import time
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from .. import __version__

DEFAULT_ENDPOINT = "http://localhost:4318/v1/traces"
DEFAULT_TIMEOUT_MS = 10_000
USER_AGENT = f"celery-events-exporter/{__version__}"
_QUAD = struct.Struct("<Q")
_TIMES = struct.Struct("<cQcQ")
"""A span's start and end, each after its field's key."""
_DOUBLE = struct.Struct("<d")

# Protobuf wire types.
VARINT, I64, LEN = 0, 1, 2
SHARED_CACHE_SIZE = 4096
"""Encoded shared attributes kept: task names x queues x workers x outcomes, mostly."""
KIND_PRODUCER, KIND_CONSUMER = 4, 5  # Span.SpanKind.SPAN_KIND_PRODUCER, _CONSUMER
Attributes = tuple[tuple[str, Any], ...]


def _tag(field_number: int, wire_type: int) -> bytes:
    """A field's key; every field number used here is below 16, so it is one byte."""
    return bytes((field_number << 3 | wire_type,))


# Field keys, named ``MESSAGE_FIELD`` after opentelemetry/proto/collector/trace/v1/
# trace_service.proto, trace/v1/trace.proto, resource/v1/resource.proto and
# common/v1/common.proto, with their field numbers.
REQUEST_RESOURCE_SPANS = _tag(1, LEN)  # ExportTraceServiceRequest.resource_spans
RESOURCE_SPANS_RESOURCE = _tag(1, LEN)
RESOURCE_SPANS_SCOPE_SPANS = _tag(2, LEN)
RESOURCE_ATTRIBUTES = _tag(1, LEN)
SCOPE_SPANS_SCOPE = _tag(1, LEN)
SCOPE_SPANS_SPANS = _tag(2, LEN)
SCOPE_NAME = _tag(1, LEN)  # InstrumentationScope
SCOPE_VERSION = _tag(2, LEN)
SPAN_TRACE_ID = _tag(1, LEN)
SPAN_SPAN_ID = _tag(2, LEN)
SPAN_TRACE_STATE = _tag(3, LEN)
SPAN_PARENT_SPAN_ID = _tag(4, LEN)
SPAN_NAME = _tag(5, LEN)
SPAN_KIND = _tag(6, VARINT)
SPAN_START_TIME = _tag(7, I64)  # start_time_unix_nano, fixed64
SPAN_END_TIME = _tag(8, I64)
SPAN_ATTRIBUTES = _tag(9, LEN)
SPAN_EVENTS = _tag(11, LEN)
SPAN_STATUS = _tag(15, LEN)
EVENT_TIME = _tag(1, I64)  # Span.Event.time_unix_nano, fixed64
EVENT_NAME = _tag(2, LEN)
EVENT_ATTRIBUTES = _tag(3, LEN)
STATUS_MESSAGE = _tag(2, LEN)
STATUS_CODE = _tag(3, VARINT)
KEY_VALUE_KEY = _tag(1, LEN)
KEY_VALUE_VALUE = _tag(2, LEN)
ANY_STRING = _tag(1, LEN)  # AnyValue.string_value
ANY_BOOL = _tag(2, VARINT)
ANY_INT = _tag(3, VARINT)
ANY_DOUBLE = _tag(4, I64)
_ID16 = SPAN_TRACE_ID + b"\x10"  # trace ids are 16 bytes, span ids 8
_ID8 = SPAN_SPAN_ID + b"\x08"
_PARENT8 = SPAN_PARENT_SPAN_ID + b"\x08"


class Span(Protocol):
    """A finished span as ``spans.TaskTrace`` and ``spans.Publish`` hold it: ids as
    integers (no parent: 0), a W3C trace state ("" for none), the OTLP span kind, times
    in nanoseconds, status as (code, message)."""

    trace_id: int
    span_id: int
    parent_span_id: int
    trace_state: str
    name: str
    kind: int
    start: int
    end: int
    status: tuple[int, str]

    def shared_key(self) -> Hashable:
        """Equal for spans whose name, kind and ``shared_attributes`` are equal."""

    def shared_attributes(self) -> Attributes:
        """Attributes many spans share, encoded with the name and kind once per
        ``shared_key``."""

    def own_attributes(self) -> Attributes:
        """Attributes of this span alone."""

    def events(self) -> list[tuple[int, str, Attributes]]:
        """(time, name, attributes) of each span event, in time order."""


class Encoder:
    """``ExportTraceServiceRequest`` bodies for spans of one resource and scope."""

    def __init__(
        self, resource: Mapping[str, Any], scope_name: str, scope_version: str | None
    ) -> None:
        self._resource = _field(RESOURCE_SPANS_RESOURCE, _attributes(RESOURCE_ATTRIBUTES, resource))
        self._shared: dict[Hashable, bytes] = {}
        self._scope = _field(
            SCOPE_SPANS_SCOPE,
            _field(SCOPE_NAME, scope_name.encode())
            + (_field(SCOPE_VERSION, scope_version.encode()) if scope_version else b""),
        )

    def encode(self, spans: Iterable[Span]) -> bytes:
        """The request, joined once: a batch is megabytes, and each copy of it counts."""
        parts = [self._scope]
        for span in spans:
            encoded = self._span(span)
            parts += (SCOPE_SPANS_SPANS, _varint(len(encoded)), encoded)
        scope_spans = sum(map(len, parts))
        head = RESOURCE_SPANS_SCOPE_SPANS + _varint(scope_spans)
        resource_spans = len(self._resource) + len(head) + scope_spans
        return b"".join(
            [REQUEST_RESOURCE_SPANS, _varint(resource_spans), self._resource, head, *parts]
        )

    def _span(self, span: Span) -> bytes:
        parts = [_ID16, span.trace_id.to_bytes(16, "big"), _ID8, span.span_id.to_bytes(8, "big")]
        if span.trace_state:
            parts.append(_trace_state(span.trace_state))
        if span.parent_span_id:
            parts += (_PARENT8, span.parent_span_id.to_bytes(8, "big"))
        shared = span.shared_key()
        encoded = self._shared.get(shared)
        if encoded is None:
            if len(self._shared) >= SHARED_CACHE_SIZE:
                self._shared.clear()
            encoded = self._shared[shared] = _name_and_kind(span.name, span.kind) + b"".join(
                [_key_value(SPAN_ATTRIBUTES, key, value) for key, value in span.shared_attributes()]
            )
        parts += (
            _TIMES.pack(SPAN_START_TIME, span.start, SPAN_END_TIME, span.end),
            encoded,
            *[_key_value(SPAN_ATTRIBUTES, key, value) for key, value in span.own_attributes()],
        )
        for at, name, attributes in span.events():
            head, tail = _event(name, attributes)
            parts += (head, _QUAD.pack(at), tail)
        parts.append(_status(*span.status))
        return b"".join(parts)


def _name_and_kind(name: str, kind: int) -> bytes:
    """The span's name and its kind: a task's publish is a producer's, its runs a consumer's."""
    return _field(SPAN_NAME, _utf8(name)) + SPAN_KIND + _varint(kind)


@lru_cache(maxsize=16)
def _trace_state(trace_state: str) -> bytes:
    return _field(SPAN_TRACE_STATE, _utf8(trace_state))


def _utf8(text: str) -> bytes:
    """UTF-8, a lone surrogate (from a decoder that lets one through) replaced: one
    bad string must not fail a batch."""
    return text.encode("utf-8", "replace")


@lru_cache(maxsize=1024)
def _event(name: str, attributes: Attributes) -> tuple[bytes, bytes]:
    """A span event but its 8 bytes of time, before and after them: one per event
    name and worker, mostly."""
    tail = _field(EVENT_NAME, _utf8(name)) + b"".join(
        _key_value(EVENT_ATTRIBUTES, key, value) for key, value in attributes
    )
    return SPAN_EVENTS + _varint(1 + 8 + len(tail)) + EVENT_TIME, tail


@lru_cache(maxsize=256)
def _status(code: int, description: str) -> bytes:
    message = _utf8(description)
    return _field(
        SPAN_STATUS,
        (_field(STATUS_MESSAGE, message) if message else b"")
        + (STATUS_CODE + _varint(code) if code else b""),
    )


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    if not attributes:
        return b""
    return b"".join([_key_value(tag, key, value) for key, value in attributes.items()])


def _key_value(tag: bytes, key: str, value: Any) -> bytes:
    """One ``KeyValue`` field. Callers cache what repeats (shared attributes,
    ``_event``); of the rest, doubles (measurements) and strings (ids), only all
    but the value's bytes are."""
    if type(value) is float:
        return _double_key(tag, key) + _DOUBLE.pack(value)
    if type(value) is str:
        data = _utf8(value)
        return _string_key(tag, key, len(data)) + data
    if isinstance(value, bool):
        any_value = ANY_BOOL + (b"\x01" if value else b"\x00")
    elif isinstance(value, int):
        any_value = ANY_INT + _varint(value & 0xFFFFFFFFFFFFFFFF)
    else:
        any_value = _field(ANY_STRING, _utf8(str(value)))
    return _field(tag, _key(key) + _field(KEY_VALUE_VALUE, any_value))


@lru_cache(maxsize=256)
def _key(key: str) -> bytes:
    return _field(KEY_VALUE_KEY, _utf8(key))


@lru_cache(maxsize=1024)
def _string_key(tag: bytes, key: str, size: int) -> bytes:
    """A string ``KeyValue`` but its ``size`` value bytes: one per key and size (a
    task id's is always 36)."""
    any_value = ANY_STRING + _varint(size)
    value = KEY_VALUE_VALUE + _varint(len(any_value) + size) + any_value
    head = _key(key) + value
    return tag + _varint(len(head) + size) + head


@lru_cache(maxsize=256)
def _double_key(tag: bytes, key: str) -> bytes:
    """A double ``KeyValue`` but its 8 value bytes, which have a fixed size."""
    head = _key(key) + KEY_VALUE_VALUE + _varint(1 + 8) + ANY_DOUBLE
    return tag + _varint(len(head) + 8) + head


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: key, varint length, payload."""
    return tag + _varint(len(payload)) + payload


_BYTES = tuple(bytes((value,)) for value in range(0x80))
"""Varints of one byte, made once: most lengths here are below 128."""


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _BYTES[value]
    if value < 0x4000:  # a span's length, mostly
        return bytes((value & 0x7F | 0x80, value >> 7))
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


RETRYABLE = frozenset({429, 502, 503, 504})
"""Statuses the OTLP specification says to retry: the collector is busy, not the data bad."""
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 8.0
MAX_REPLY_BYTES = 64 * 1024
"""Of a collector's reply only this much is read: a partial success is a few bytes."""
COMPRESSIONS = ("gzip", "none")


def timeout_seconds(environ: Mapping[str, str]) -> float:
    """The export timeout, ``OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT`` in milliseconds: the time
    one batch may take, retries included, whatever the protocol."""
    name, text = _setting(environ, "TIMEOUT")
    if not text:
        return DEFAULT_TIMEOUT_MS / 1000
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ValueError(f"{name}: expected a positive number of milliseconds, got {text!r}")
    return value / 1000


def compression(environ: Mapping[str, str]) -> str:
    """``gzip`` or ``none``, from ``OTEL_EXPORTER_OTLP_[TRACES_]COMPRESSION``."""
    name, text = _setting(environ, "COMPRESSION")
    value = text.lower() or "none"
    if value not in COMPRESSIONS:
        raise ValueError(f"{name}: expected one of {', '.join(COMPRESSIONS)}, got {text!r}")
    return value


def _setting(environ: Mapping[str, str], name: str) -> tuple[str, str]:
    """The variable that sets ``name`` (the ``_TRACES_`` form first) and its value."""
    for variable in (f"OTEL_EXPORTER_OTLP_TRACES_{name}", f"OTEL_EXPORTER_OTLP_{name}"):
        value = environ.get(variable, "").strip()
        if value:
            return variable, value
    return f"OTEL_EXPORTER_OTLP_{name}", ""


@dataclass(frozen=True)
class Delivery:
    """What became of a batch the collector took: how many tries it needed, and what a
    partial success said (spans rejected, and why)."""

    retries: int = 0
    rejected: int = 0
    message: str = ""


class ExportError(Exception):
    """A batch the collector did not take, after any retries the time allowed."""

    def __init__(self, message: str, retries: int = 0) -> None:
        super().__init__(message)
        self.retries = retries


class HttpSender:
    """POSTs encoded batches to the collector the environment names, over one
    kept-alive connection (one TLS handshake, not one a batch).

    A batch the collector is too busy for (429, 502, 503, 504) or a connection
    that fails is tried again after an exponential backoff with jitter, or after
    the collector's ``Retry-After``, as long as the export timeout allows.
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        def setting(name: str) -> str:
            return _setting(environ, name)[1]

        base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        self.endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip() or (
            base.rstrip("/") + "/v1/traces" if base else DEFAULT_ENDPOINT
        )
        url = urlsplit(self.endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(
                f"the OTLP endpoint must be an http:// or https:// URL, got {self.endpoint!r}"
            )
        self._host, self._port = url.hostname, url.port
        self._path = url.path + (f"?{url.query}" if url.query else "") or "/"
        self._connection: http.client.HTTPConnection | None = None
        self.headers = {
            "Content-Type": "application/x-protobuf",
            "User-Agent": USER_AGENT,
            **parse_headers(setting("HEADERS")),
        }
        self.gzip = compression(environ) == "gzip"
        if self.gzip:
            self.headers["Content-Encoding"] = "gzip"
        self.timeout = timeout_seconds(environ)
        self.stopping = threading.Event()
        """Set when the daemon stops: no more waiting to retry."""
        self.context: ssl.SSLContext | None = None
        if self.endpoint.startswith("https:"):
            self.context = ssl.create_default_context(cafile=setting("CERTIFICATE") or None)
            if setting("CLIENT_CERTIFICATE"):
                self.context.load_cert_chain(
                    setting("CLIENT_CERTIFICATE"), setting("CLIENT_KEY") or None
                )

    def send(self, body: bytes) -> Delivery:
        """Deliver one request body within the timeout; ``ExportError`` saying why when
        the collector does not take it.

        A kept-alive connection the collector has since closed fails the first
        try: the batch then goes again at once, on a new connection.
        """
        data = gzip.compress(body, compresslevel=1) if self.gzip else body
        deadline = time.monotonic() + self.timeout
        retries, backoff = 0, FIRST_BACKOFF_SECONDS
        reused = self._connection is not None
        while True:
            remaining = deadline - time.monotonic()
            delay: float | None = None
            try:
                status, reason, retry_after, reply = self._post(data, max(remaining, 0.001))
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                failure = str(exc) or type(exc).__name__
                if reused:  # closed while idle: not the collector's answer to this batch
                    delay = 0.0
            else:
                if 200 <= status < 300:
                    return Delivery(retries, *partial_success(reply))
                failure = f"HTTP {status} {reason}".rstrip()
                if status not in RETRYABLE:
                    raise ExportError(f"{self.endpoint}: {failure}", retries)
                delay = retry_after
            reused = False
            if delay is None:
                delay = backoff * (0.5 + random.random() / 2)  # jitter: half to all of it
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
            # A resend on a fresh connection (no delay) goes even when stopping.
            if (delay and self.stopping.is_set()) or time.monotonic() + delay >= deadline:
                tries = f" (tried {retries + 1} times)" if retries else ""
                raise ExportError(f"{self.endpoint}: {failure}{tries}", retries)
            if delay and self.stopping.wait(delay):
                raise ExportError(f"{self.endpoint}: {failure} (stopping)", retries)
            retries += 1

    def _post(self, data: bytes, timeout: float) -> tuple[int, str, float | None, bytes]:
        """One try: the status, reason, ``Retry-After`` in seconds, and the reply's start."""
        connection = self._connection
        if connection is None:
            connection = self._connection = (
                http.client.HTTPSConnection(
                    self._host, self._port, timeout=timeout, context=self.context
                )
                if self.context
                else http.client.HTTPConnection(self._host, self._port, timeout=timeout)
            )
        connection.timeout = timeout
        if connection.sock is not None:
            connection.sock.settimeout(timeout)
        connection.request("POST", self._path, data, self.headers)
        response = connection.getresponse()
        reply = response.read(MAX_REPLY_BYTES)
        if not response.isclosed():  # more than a reply should be: not worth reading
            self.close()
        return response.status, response.reason, _retry_after(response), reply

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _retry_after(response: http.client.HTTPResponse) -> float | None:
    """``Retry-After`` in seconds (a number or an HTTP date), None when absent or unreadable."""
    value = (response.getheader("Retry-After") or "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def partial_success(reply: bytes) -> tuple[int, str]:
    """``rejected_spans`` and ``error_message`` of an ``ExportTraceServiceResponse``'s
    ``partial_success``; (0, "") for an empty reply, or one that does not parse."""
    try:
        for number, value in _fields(reply):
            if number == 1 and isinstance(value, bytes):  # partial_success
                rejected, message = 0, ""
                for inner, item in _fields(value):
                    if inner == 1 and isinstance(item, int):  # rejected_spans, int64
                        rejected = item if item < 1 << 63 else 0
                    elif inner == 2 and isinstance(item, bytes):  # error_message
                        message = item.decode("utf-8", "replace")
                return rejected, message
    except ValueError:
        pass
    return 0, ""


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """The (field number, value) pairs of a protobuf message: varints as ints,
    length-delimited fields as bytes; ``ValueError`` when it is not one."""
    position, end = 0, len(data)
    while position < end:
        key, position = _read_varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == VARINT:
            value, position = _read_varint(data, position)
            yield number, value
        elif wire_type == LEN:
            size, position = _read_varint(data, position)
            if position + size > end:
                raise ValueError("truncated")
            yield number, data[position : position + size]
            position += size
        elif wire_type in (I64, 5):  # fixed64, fixed32: skipped
            position += 8 if wire_type == I64 else 4
        else:
            raise ValueError(f"wire type {wire_type}")
    if position != end:
        raise ValueError("truncated")


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while position < len(data) and shift < 64:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
    raise ValueError("bad varint")


def parse_headers(text: str) -> dict[str, str]:
    """``key=value,key2=value2`` with URL-encoded values, as the OTLP specification has it."""
    headers = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            headers[unquote(key.strip())] = unquote(value.strip())
    return headers
