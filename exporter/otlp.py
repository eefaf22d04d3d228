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
        group[2].append(_span(span))
    return b"".join(
        _field(0x0A, _field(0x0A, _attributes(0x0A, resource.attributes))
               + _field(0x12, _scope(scope) + b"".join(_field(0x12, span) for span in encoded)))
        for resource, scope, encoded in groups.values()
    )


def _span(span: Any) -> bytes:
    context, parent, status = span.context, span.parent, span.status
    parts = [b"\x0a\x10", context.trace_id.to_bytes(16, "big"),
             b"\x12\x08", context.span_id.to_bytes(8, "big")]
    if parent is not None:
        parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
    parts += (_field(0x2A, span.name.encode()), b"\x30", _varint(span.kind.value + 1),
              b"\x39", _QUAD.pack(span.start_time), b"\x41", _QUAD.pack(span.end_time),
              _attributes(0x4A, span.attributes))
    for event in span.events:
        parts.append(_field(0x5A, b"\x09" + _QUAD.pack(event.timestamp)
                            + _field(0x12, event.name.encode())
                            + _attributes(0x1A, event.attributes)))
    code = status.status_code.value
    message = (status.description or "").encode()
    parts.append(_field(0x7A, (_field(0x12, message) if message else b"")
                        + (b"\x18" + _varint(code) if code else b"")))
    return b"".join(parts)


def _scope(scope: Any) -> bytes:
    return _field(0x0A, _field(0x0A, scope.name.encode())
                  + (_field(0x12, scope.version.encode()) if scope.version else b""))


def _attributes(tag: int, attributes: Mapping[str, Any] | None) -> bytes:
    if not attributes:
        return b""
    return b"".join([_key_value(tag, key, value) for key, value in attributes.items()])


@lru_cache(maxsize=4096, typed=True)
def _key_value(tag: int, key: str, value: Any) -> bytes:
    """One ``KeyValue`` field; cached, as most pairs repeat from span to span."""
    if isinstance(value, bool):
        any_value = b"\x10" + (b"\x01" if value else b"\x00")
    elif isinstance(value, int):
        any_value = b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    elif isinstance(value, float):
        any_value = b"\x21" + _DOUBLE.pack(value)
    else:
        any_value = _field(0x0A, str(value).encode())
    return _field(tag, _field(0x0A, key.encode()) + _field(0x12, any_value))


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field; every tag used here fits one byte."""
    size = len(payload)
    return bytes((tag, size)) + payload if size < 0x80 else bytes((tag,)) + _varint(size) + payload


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
