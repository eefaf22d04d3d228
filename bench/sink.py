"""The bench's OTLP/HTTP endpoint: counts requests, bytes and spans.

Decoding each body falls on the bench process, never on the exporter it measures.
"""

from __future__ import annotations

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.otlp_endpoint import OtlpEndpoint


class TraceSink(OtlpEndpoint):
    """Counts the requests, bytes and spans an exporter posts to ``endpoint``."""

    def __init__(self) -> None:
        self.bytes = self.spans = 0
        super().__init__()

    def received(self, request: ExportTraceServiceRequest, size: int) -> None:
        self.bytes += size
        self.spans += sum(
            len(scope.spans)
            for resource in request.resource_spans
            for scope in resource.scope_spans
        )

    def counts(self) -> dict[str, int]:
        return {"requests": self.requests, "bytes": self.bytes, "spans": self.spans}

    def close(self) -> None:
        self.stop()
