"""A tiny OTLP/HTTP endpoint for the bench: answers 200 to POST /v1/traces and counts.

It decodes each body with the OTLP protobuf classes to count spans; that
cost falls on the bench process, never on the exporter it measures.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


class TraceSink:
    """Counts the requests, bytes and spans an exporter posts to ``endpoint``."""

    def __init__(self) -> None:
        self.requests = self.bytes = self.spans = 0
        lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # kept-alive connections, as collectors serve them

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                request = ExportTraceServiceRequest.FromString(body)
                spans = sum(len(scope.spans) for resource in request.resource_spans
                            for scope in resource.scope_spans)
                with lock:
                    sink.requests += 1
                    sink.bytes += len(body)
                    sink.spans += spans
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def counts(self) -> dict[str, int]:
        return {"requests": self.requests, "bytes": self.bytes, "spans": self.spans}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
