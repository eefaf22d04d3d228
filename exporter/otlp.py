"""OTLP/HTTP protobuf for the spans ``tracing`` builds: encoding and sending.

The SDK's generic encoder builds a protobuf object per field and costs
tens of microseconds a span, more than the rest of a task's events
together. These spans have one shape (attributes, events, status, a
parent; no links or trace state), so they are written to the wire format
directly, with the attributes that repeat (task names, queues, hosts,
outcomes) encoded once. Only the standard library is used; ``tracing`` wraps this
in an SDK ``SpanExporter``.

The destination follows the standard environment variables:
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (else ``OTEL_EXPORTER_OTLP_ENDPOINT``
plus ``/v1/traces``), and the ``_HEADERS``, ``_TIMEOUT`` (milliseconds),
``_COMPRESSION`` (``gzip``), ``_CERTIFICATE``, ``_CLIENT_CERTIFICATE`` and
``_CLIENT_KEY`` variables, the ``_TRACES_`` form first.
"""

from __future__ import annotations

import gzip
import http.client
import ssl
import struct
from collections.abc import Hashable, Iterable, Mapping
from functools import lru_cache
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

DEFAULT_ENDPOINT = "http://localhost:4318/v1/traces"
DEFAULT_TIMEOUT_MS = 10_000
_QUAD = struct.Struct("<Q")
_DOUBLE = struct.Struct("<d")

# Protobuf wire types.
VARINT, I64, LEN = 0, 1, 2
SHARED_CACHE_SIZE = 4096
"""Encoded shared attributes kept: task names x queues x workers x outcomes, mostly."""
KIND_CONSUMER = 5  # Span.SpanKind.SPAN_KIND_CONSUMER
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


class ExportError(Exception):
    """A batch the collector did not take."""


class Span(Protocol):
    """A finished span as ``tracing.TaskTrace`` holds it: ids as integers (no parent: 0),
    times in nanoseconds, status as (code, message)."""

    trace_id: int
    span_id: int
    parent_span_id: int
    name: str
    start: int
    end: int
    status: tuple[int, str]

    def shared_key(self) -> Hashable:
        """Equal for spans whose ``shared_attributes`` are equal."""

    def shared_attributes(self) -> Attributes:
        """Attributes many spans share, encoded once per ``shared_key``."""

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
        if span.parent_span_id:
            parts += (_PARENT8, span.parent_span_id.to_bytes(8, "big"))
        parts += (
            _name_and_kind(span.name),
            SPAN_START_TIME,
            _QUAD.pack(span.start),
            SPAN_END_TIME,
            _QUAD.pack(span.end),
        )
        shared = span.shared_key()
        encoded = self._shared.get(shared)
        if encoded is None:
            if len(self._shared) >= SHARED_CACHE_SIZE:
                self._shared.clear()
            encoded = self._shared[shared] = b"".join(
                [_key_value(SPAN_ATTRIBUTES, key, value) for key, value in span.shared_attributes()]
            )
        parts.append(encoded)
        parts += [_key_value(SPAN_ATTRIBUTES, key, value) for key, value in span.own_attributes()]
        for time, name, attributes in span.events():
            head, tail = _event(name, attributes)
            parts += (head, _QUAD.pack(time), tail)
        parts.append(_status(*span.status))
        return b"".join(parts)


@lru_cache(maxsize=1024)
def _name_and_kind(name: str) -> bytes:
    """The span's name, and its kind: a task's span is a consumer's."""
    return _field(SPAN_NAME, name.encode()) + SPAN_KIND + _varint(KIND_CONSUMER)


@lru_cache(maxsize=1024)
def _event(name: str, attributes: Attributes) -> tuple[bytes, bytes]:
    """A span event but its 8 bytes of time, before and after them: one per event
    name and worker, mostly."""
    tail = _field(EVENT_NAME, name.encode()) + b"".join(
        _key_value(EVENT_ATTRIBUTES, key, value) for key, value in attributes
    )
    return SPAN_EVENTS + _varint(1 + 8 + len(tail)) + EVENT_TIME, tail


@lru_cache(maxsize=256)
def _status(code: int, description: str) -> bytes:
    message = description.encode()
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
    ``_event``); of the rest, doubles (measurements) and strings (ids), only the key is."""
    if type(value) is float:
        return _double_key(tag, key) + _DOUBLE.pack(value)
    if type(value) is str:
        any_value = _field(ANY_STRING, value.encode())
    elif isinstance(value, bool):
        any_value = ANY_BOOL + (b"\x01" if value else b"\x00")
    elif isinstance(value, int):
        any_value = ANY_INT + _varint(value & 0xFFFFFFFFFFFFFFFF)
    else:
        any_value = _field(ANY_STRING, str(value).encode())
    return _field(tag, _key(key) + _field(KEY_VALUE_VALUE, any_value))


@lru_cache(maxsize=256)
def _key(key: str) -> bytes:
    return _field(KEY_VALUE_KEY, key.encode())


@lru_cache(maxsize=256)
def _double_key(tag: bytes, key: str) -> bytes:
    """A double ``KeyValue`` but its 8 value bytes, which have a fixed size."""
    head = _field(KEY_VALUE_KEY, key.encode()) + KEY_VALUE_VALUE + bytes((1 + 8,)) + ANY_DOUBLE
    return tag + _varint(len(head) + 8) + head


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: key, varint length, payload."""
    size = len(payload)
    return tag + (bytes((size,)) if size < 0x80 else _varint(size)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class HttpSender:
    """POSTs encoded batches to the collector the environment names, over one
    kept-alive connection (one TLS handshake, not one a batch)."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        def setting(name: str) -> str:
            return (
                environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}")
                or environ.get(f"OTEL_EXPORTER_OTLP_{name}")
                or ""
            ).strip()

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
            **parse_headers(setting("HEADERS")),
        }
        self.gzip = setting("COMPRESSION").lower() == "gzip"
        if self.gzip:
            self.headers["Content-Encoding"] = "gzip"
        self.timeout = float(setting("TIMEOUT") or DEFAULT_TIMEOUT_MS) / 1000
        self.context: ssl.SSLContext | None = None
        if self.endpoint.startswith("https:"):
            self.context = ssl.create_default_context(cafile=setting("CERTIFICATE") or None)
            if setting("CLIENT_CERTIFICATE"):
                self.context.load_cert_chain(
                    setting("CLIENT_CERTIFICATE"), setting("CLIENT_KEY") or None
                )

    def send(self, body: bytes) -> None:
        """Deliver one request body; ``ExportError`` saying why when the collector refuses it.

        A kept-alive connection the collector has since closed fails the first
        try: the batch then goes once more, on a new connection.
        """
        data = gzip.compress(body, compresslevel=1) if self.gzip else body
        for last_try in (self._connection is None, True):
            try:
                status, reason = self._post(data)
                break
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if last_try:
                    detail = str(exc) or type(exc).__name__
                    raise ExportError(f"{self.endpoint}: {detail}") from None
        if not 200 <= status < 300:
            raise ExportError(f"{self.endpoint}: HTTP {status} {reason}")

    def _post(self, data: bytes) -> tuple[int, str]:
        if self._connection is None:
            self._connection = (
                http.client.HTTPSConnection(
                    self._host, self._port, timeout=self.timeout, context=self.context
                )
                if self.context
                else http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
            )
        self._connection.request("POST", self._path, data, self.headers)
        response = self._connection.getresponse()
        response.read()
        return response.status, response.reason

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def parse_headers(text: str) -> dict[str, str]:
    """``key=value,key2=value2`` with URL-encoded values, as the OTLP specification has it."""
    headers = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            headers[unquote(key.strip())] = unquote(value.strip())
    return headers
