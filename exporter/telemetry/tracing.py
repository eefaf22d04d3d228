"""OpenTelemetry traces rebuilt from the event stream: the span hooks wired to a
span queue as the standard ``OTEL_*`` variables say.

``spans`` holds the shape of a task's spans, ``span_hooks`` fills them in from
the events, ``sampling`` decides which workflows are kept and derives their
ids, and ``delivery`` batches and sends them. The daemon imports this module
only when traces are on; only ``otel`` imports OpenTelemetry.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..config import ConfigError
from .delivery import BATCH_SETTINGS, SpanCounts, SpanQueue, batch_setting, origin, span_exporter
from .metrics import Metrics
from .sampling import sampler_ratio
from .span_hooks import Spans


def build(
    metrics: Metrics, sample_ratio: float = 1.0, environ: Mapping[str, str] | None = None
) -> Spans:
    """Spans exported by OTLP as the standard OTEL_* environment variables say, counted
    in ``metrics``, whose run time and queue wait histograms get exemplars."""
    environ = os.environ if environ is None else environ
    ratio = sampler_ratio(environ, sample_ratio)
    resource, scope = origin()
    counts = SpanCounts(metrics.counter("celery_exporter_spans_total"))
    exporter = span_exporter(environ, resource, scope, counts)
    delay, queue_size, batch_size = (
        batch_setting(environ, variable, default) for variable, default in BATCH_SETTINGS
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
