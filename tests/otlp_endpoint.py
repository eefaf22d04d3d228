"""An OTLP/HTTP trace endpoint in this process, for the tests and the bench.

It serves ``POST /v1/traces`` with protobuf bodies (gzip too) over HTTP/1.1
kept-alive connections, as collectors do, decodes each request with the
OTLP protobuf classes and hands it to ``received``. A test may script how
the next requests are answered instead (``answers``: refusals, a hang,
garbage), and what an accepted one is told (``reply``: a partial success).
"""

from __future__ import annotations

import contextlib
import gzip
import socket
import threading
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


class OtlpEndpoint:
    """Decodes what an exporter posts to ``endpoint``; subclasses say what to keep."""

    def __init__(self) -> None:
        self.requests = 0
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()
        self.answers: deque[Callable[[BaseHTTPRequestHandler], None]] = deque()
        """Each request takes the first, if any, which answers it in place of accepting."""
        self.answered = 0
        self.user_agents: set[str] = set()
        self.reply = ExportTraceServiceResponse()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with endpoint.lock:
                    endpoint.connections.append(self.connection)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with endpoint.lock:
                    endpoint.user_agents.add(self.headers.get("User-Agent", ""))
                    answer = endpoint.answers.popleft() if endpoint.answers else None
                    endpoint.answered += answer is not None
                if answer is not None:
                    answer(self)
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if (
                    self.path != "/v1/traces"
                    or self.headers["Content-Type"] != "application/x-protobuf"
                ):
                    self.send_error(404 if self.path != "/v1/traces" else 415)
                    return
                request = ExportTraceServiceRequest.FromString(body)
                with endpoint.lock:
                    endpoint.requests += 1
                    endpoint.received(request, len(body))
                reply = endpoint.reply.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def received(self, request: ExportTraceServiceRequest, size: int) -> None:
        """One request, of ``size`` bytes as decompressed; called under ``lock``."""

    def drop_connections(self) -> None:
        """Close every connection from this side, as a collector does with idle ones."""
        for connection in self.connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self.drop_connections()
        self.server.shutdown()
        self.server.server_close()
