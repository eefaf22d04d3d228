"""OTLP/HTTP protobuf for the spans ``tracing`` builds: encoding and sending.

The SDK's generic encoder builds a protobuf object per field and costs
tens of microseconds a span, more than the rest of a task's events
together. These spans have one shape (attributes, events, status, a
parent; no links or trace state), so they are written to the wire format
directly, with the key/value pairs that repeat (task names, queues, hosts)
encoded once. Only the standard library is used; ``tracing`` wraps this
in an SDK ``SpanExporter``.

The destination follows the standard environment variables:
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (else ``OTEL_EXPORTER_OTLP_ENDPOINT``
plus ``/v1/traces``), and the ``_HEADERS``, ``_TIMEOUT`` (milliseconds),
``_COMPRESSION`` (``gzip``), ``_CERTIFICATE``, ``_CLIENT_CERTIFICATE`` and
``_CLIENT_KEY`` variables, the ``_TRACES_`` form first.
"""

from __future__ import annotations

import gzip
import ssl
import struct
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

DEFAULT_ENDPOINT = "http://localhost:4318/v1/traces"
DEFAULT_TIMEOUT_MS = 10_000
_QUAD = struct.Struct("<Q")
_DOUBLE = struct.Struct("<d")

# Protobuf wire types.
VARINT, I64, LEN = 0, 1, 2


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


def encode(spans: Iterable[Any]) -> bytes:
    """An ``ExportTraceServiceRequest`` of SDK ``ReadableSpan``s, grouped by resource and scope."""
    groups: dict[tuple[int, int], tuple[Any, Any, list[bytes]]] = {}
    for span in spans:
        resource, scope = span.resource, span.instrumentation_scope
        group = groups.get((id(resource), id(scope)))
        if group is None:
            group = groups[id(resource), id(scope)] = (resource, scope, [])
        group[2].append(_field(SCOPE_SPANS_SPANS, _span(span)))
    return b"".join(
        _field(REQUEST_RESOURCE_SPANS,
               _field(RESOURCE_SPANS_RESOURCE,
                      _attributes(RESOURCE_ATTRIBUTES, resource.attributes))
               + _field(RESOURCE_SPANS_SCOPE_SPANS, _scope(scope) + b"".join(encoded)))
        for resource, scope, encoded in groups.values()
    )


def _span(span: Any) -> bytes:
    context, parent = span.context, span.parent
    parts = [_ID16, context.trace_id.to_bytes(16, "big"), _ID8, context.span_id.to_bytes(8, "big")]
    if parent is not None:
        parts += (_PARENT8, parent.span_id.to_bytes(8, "big"))
    parts += (_name_and_kind(span.name, span.kind.value),
              SPAN_START_TIME, _QUAD.pack(span.start_time),
              SPAN_END_TIME, _QUAD.pack(span.end_time))
    parts += [_key_value(SPAN_ATTRIBUTES, key, value) for key, value in span.attributes.items()]
    for event in span.events:
        tail = _event_tail(event.name, tuple(event.attributes.items()))
        parts.append(_field(SPAN_EVENTS, EVENT_TIME + _QUAD.pack(event.timestamp) + tail))
    parts.append(_status(span.status.status_code.value, span.status.description))
    return b"".join(parts)


@lru_cache(maxsize=1024)
def _name_and_kind(name: str, kind: int) -> bytes:
    """``name`` and ``kind``: the SDK's ``SpanKind`` counts from 0, OTLP's from 1 (unspecified)."""
    return _field(SPAN_NAME, name.encode()) + SPAN_KIND + _varint(kind + 1)


@lru_cache(maxsize=1024)
def _event_tail(name: str, attributes: tuple[tuple[str, Any], ...]) -> bytes:
    """A span event but its time: one per event name and worker, mostly."""
    return _field(EVENT_NAME, name.encode()) + b"".join(
        _key_value(EVENT_ATTRIBUTES, key, value) for key, value in attributes)


@lru_cache(maxsize=256)
def _status(code: int, description: str | None) -> bytes:
    message = (description or "").encode()
    return _field(SPAN_STATUS, (_field(STATUS_MESSAGE, message) if message else b"")
                  + (STATUS_CODE + _varint(code) if code else b""))


def _scope(scope: Any) -> bytes:
    return _field(SCOPE_SPANS_SCOPE, _field(SCOPE_NAME, scope.name.encode())
                  + (_field(SCOPE_VERSION, scope.version.encode()) if scope.version else b""))


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    if not attributes:
        return b""
    return b"".join([_key_value(tag, key, value) for key, value in attributes.items()])


def _key_value(tag: bytes, key: str, value: Any) -> bytes:
    """One ``KeyValue`` field; floats (measurements, seldom repeated) cache only their key."""
    if type(value) is float:
        return _double_key(tag, key) + _DOUBLE.pack(value)
    return _cached_key_value(tag, key, value)


@lru_cache(maxsize=256)
def _double_key(tag: bytes, key: str) -> bytes:
    """A double ``KeyValue`` but its 8 value bytes, which have a fixed size."""
    head = _field(KEY_VALUE_KEY, key.encode()) + KEY_VALUE_VALUE + bytes((1 + 8,)) + ANY_DOUBLE
    return tag + _varint(len(head) + 8) + head


@lru_cache(maxsize=4096, typed=True)
def _cached_key_value(tag: bytes, key: str, value: Any) -> bytes:
    """Most pairs (task names, queues, hosts, states) repeat from span to span."""
    if isinstance(value, bool):
        any_value = ANY_BOOL + (b"\x01" if value else b"\x00")
    elif isinstance(value, int):
        any_value = ANY_INT + _varint(value & 0xFFFFFFFFFFFFFFFF)
    else:
        any_value = _field(ANY_STRING, str(value).encode())
    return _field(tag, _field(KEY_VALUE_KEY, key.encode()) + _field(KEY_VALUE_VALUE, any_value))


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
    """POSTs encoded batches to the collector the environment names."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        def setting(name: str) -> str:
            return (environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}")
                    or environ.get(f"OTEL_EXPORTER_OTLP_{name}") or "").strip()

        base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        self.endpoint = (environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
                         or (base.rstrip("/") + "/v1/traces" if base else DEFAULT_ENDPOINT))
        self.headers = {"Content-Type": "application/x-protobuf", **parse_headers(
            setting("HEADERS"))}
        self.gzip = setting("COMPRESSION").lower() == "gzip"
        if self.gzip:
            self.headers["Content-Encoding"] = "gzip"
        self.timeout = float(setting("TIMEOUT") or DEFAULT_TIMEOUT_MS) / 1000
        self.context: ssl.SSLContext | None = None
        if self.endpoint.startswith("https:"):
            self.context = ssl.create_default_context(cafile=setting("CERTIFICATE") or None)
            if setting("CLIENT_CERTIFICATE"):
                self.context.load_cert_chain(setting("CLIENT_CERTIFICATE"),
                                             setting("CLIENT_KEY") or None)

    def send(self, body: bytes) -> None:
        """Deliver one request body; ``ExportError`` saying why when the collector refuses it."""
        data = gzip.compress(body, compresslevel=1) if self.gzip else body
        request = urllib.request.Request(self.endpoint, data, self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout,
                                        context=self.context) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            raise ExportError(f"{self.endpoint}: HTTP {exc.code} {exc.reason}") from None
        except (OSError, ValueError) as exc:
            raise ExportError(f"{self.endpoint}: {exc}") from None


def parse_headers(text: str) -> dict[str, str]:
    """``key=value,key2=value2`` with URL-encoded values, as the OTLP specification has it."""
    headers = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            headers[unquote(key.strip())] = unquote(value.strip())
    return headers
