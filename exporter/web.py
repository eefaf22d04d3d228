"""The HTTP endpoint: /metrics, /healthz, /readyz and a landing page.

Served from its own threads and reading only what the event thread already
recorded, so a scrape never waits on the broker or the workers.
"""

from __future__ import annotations

import gzip
import html
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, generate_latest

from . import __version__
from .exposition import Registry
from .webconfig import WebSecurity

log = logging.getLogger(__name__)

OPEN_PATHS = ("/healthz", "/readyz")
"""Probes answer without credentials: kubelets and load balancers cannot log in,
and all they tell is one bit each."""
QUIET_SECONDS = 60.0
"""No event for this long after connecting earns a diagnosis on the landing page."""


@dataclass(frozen=True)
class WorkerStatus:
    hostname: str
    up: bool
    last_heartbeat: float
    version: str


@dataclass(frozen=True)
class Status:
    """What the landing page and the probes show."""

    broker: str
    connected: bool
    alive: bool
    last_error: str
    started_at: float
    events_received: int
    last_event_at: float | None
    workers: tuple[WorkerStatus, ...]


class Handler(BaseHTTPRequestHandler):
    """Routes the four paths; everything else is 404."""

    server: ExporterServer
    protocol_version = "HTTP/1.1"
    timeout = 30.0
    """Seconds a connection may stall (handshake, request or idle keep-alive)."""

    def handle(self) -> None:
        if isinstance(self.connection, ssl.SSLSocket):
            try:
                self.connection.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                log.debug("TLS handshake with %s failed: %s", self.address_string(), exc)
                return
        super().handle()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        security = self.server.security
        if (
            security
            and path not in OPEN_PATHS
            and not security.current().authorized(self.headers.get("Authorization"))
        ):
            self._send(
                401,
                b"unauthorized\n",
                headers={
                    "WWW-Authenticate": 'Basic realm="celery-events-exporter", charset="UTF-8"'
                },
            )
        elif path == "/metrics":
            self._metrics()
        elif path == "/healthz":
            alive = self.server.status().alive
            self._send(200 if alive else 503, b"ok\n" if alive else b"receive loop stalled\n")
        elif path == "/readyz":
            connected = self.server.status().connected
            self._send(
                200 if connected else 503,
                b"ok\n" if connected else b"not connected to the broker\n",
            )
        elif path == "/":
            page = landing_page(self.server.status(), time.time())
            self._send(200, page.encode(), "text/html; charset=utf-8")
        else:
            self._send(404, b"not found\n")

    def _metrics(self) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        registry = self.server.registry
        if encoder is generate_latest and isinstance(registry, Registry):
            body = registry.text()  # the same bytes, without an object per sample
        else:
            body = encoder(registry)
        if "gzip" in self.headers.get("Accept-Encoding", ""):
            self._send(
                200,
                gzip.compress(body, compresslevel=1),
                content_type,
                {"Content-Encoding": "gzip"},
            )
        else:
            self._send(200, body, content_type)

    def _send(
        self,
        code: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s - %s", self.address_string(), format % args)


class ExporterServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        registry: CollectorRegistry,
        status: Callable[[], Status],
        security: WebSecurity | None = None,
    ) -> None:
        super().__init__(address, Handler)
        self.registry = registry
        self.status = status
        self.security = security

    def get_request(self) -> tuple[socket.socket, object]:
        """Each connection gets the TLS context in force when it arrives.

        The handshake itself runs on the connection's own thread (``Handler.handle``),
        so a slow client never holds up the accept loop.
        """
        sock, address = super().get_request()
        context = self.security.current().ssl_context if self.security else None
        if context is not None:
            sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hangs up mid-request is routine, not a traceback on stderr."""
        log.debug("connection from %s failed", client_address, exc_info=True)


def serve(
    host: str,
    port: int,
    registry: CollectorRegistry,
    status: Callable[[], Status],
    security: WebSecurity | None = None,
) -> ExporterServer:
    """Start serving in a background thread; ``shutdown()`` stops it."""
    server = ExporterServer((host, port), registry, status, security)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server


def diagnosis(status: Status, now: float) -> str:
    """A plain sentence on why no data may be showing, or empty when all is well."""
    if not status.connected:
        error = f" ({status.last_error})" if status.last_error else ""
        return f"Not connected to the broker{error}. Retrying; check the broker URL and network."
    quiet_since = status.last_event_at or status.started_at
    if now - quiet_since > QUIET_SECONDS:
        return (
            "Connected, but no events for a minute. Are the workers started with -E "
            "(or worker_send_task_events = True)? Are they on this broker and vhost/db?"
        )
    return ""


def landing_page(status: Status, now: float) -> str:
    esc = html.escape
    rows = (
        "".join(
            f"<tr><td>{esc(w.hostname)}</td><td>{'up' if w.up else 'down'}</td>"
            f"<td>{now - w.last_heartbeat:.0f} s ago</td><td>{esc(w.version)}</td></tr>"
            for w in status.workers
        )
        or '<tr><td colspan="4">No worker seen yet.</td></tr>'
    )
    problem = diagnosis(status, now)
    last = f"{now - status.last_event_at:.0f} s ago" if status.last_event_at else "never"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Celery events exporter</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 12px;text-align:left}}
.problem{{background:#fee;border:1px solid #c33;padding:8px}}</style></head>
<body><h1>Celery events exporter {esc(__version__)}</h1>
<p><a href="/metrics">Metrics</a> · <a href="/healthz">/healthz</a> ·
<a href="/readyz">/readyz</a></p>
{f'<p class="problem">{esc(problem)}</p>' if problem else ""}
<table>
<tr><th>Broker</th><td>{esc(status.broker)}</td></tr>
<tr><th>Connection</th><td>{"connected" if status.connected else "disconnected"}</td></tr>
<tr><th>Events received</th><td>{status.events_received}</td></tr>
<tr><th>Last event</th><td>{last}</td></tr>
</table>
<h2>Workers</h2>
<table><tr><th>Hostname</th><th>State</th><th>Last heartbeat</th><th>Version</th></tr>
{rows}</table>
</body></html>
"""
