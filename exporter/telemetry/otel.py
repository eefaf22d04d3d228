"""The OpenTelemetry SDK, imported here alone: a missing package is a configuration
mistake, told in one line, and the daemon imports it only when traces are on."""

from __future__ import annotations

from ..config import ConfigError

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

__all__ = [
    "SERVICE_NAME",
    "InstrumentationScope",
    "OTELResourceDetector",
    "ReadableSpan",
    "Resource",
    "SpanContext",
    "SpanEvent",
    "SpanExportResult",
    "SpanExporter",
    "SpanKind",
    "SpanProcessor",
    "Status",
    "StatusCode",
    "TraceFlags",
    "TraceState",
]
