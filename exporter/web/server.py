"""The HTTP endpoint: /metrics, /healthz, /readyz, the overview page and its API.

Served from its own threads and reading only what the event thread already
recorded, so a scrape never waits on the broker or the workers. The page's
assets ship in the package (``exporter/web/static``) and are served under a
strict Content-Security-Policy: no inline script or style, nothing from
elsewhere.
"""

from __future__ import annotations

import gzip
import html
import logging
import socket
import ssl
import string
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, generate_latest

from .. import __version__
from ..telemetry.exposition import Registry
from .webconfig import WebSecurity

log = logging.getLogger(__name__)

OPEN_PATHS = ("/healthz", "/readyz")
"""Probes answer without credentials: kubelets and load balancers cannot log in,
and all they tell is one bit each."""
QUIET_SECONDS = 60.0
"""No event for this long after connecting earns a diagnosis on the landing page."""
API_PATH = "/api/v1/overview"
TASKS_PATH = "/api/v1/tasks"
_STATIC = resources.files(__package__) / "static"
PAGE = string.Template((_STATIC / "index.html").read_text(encoding="utf-8"))
ASSETS: dict[str, tuple[bytes, str]] = {
    f"/static/{name}": ((_STATIC / name).read_bytes(), content_type)
    for name, content_type in (
        ("overview.js", "text/javascript; charset=utf-8"),
        ("overview.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
    )
}
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
"""On the page, its assets and its API: a value from the network can never run as code."""
TaskAnswer = Callable[[str, str], tuple[int, dict[str, Any]]]
"""Answers a task lookup: the path and the query string to a status and a JSON body."""


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
            self._send(200, page.encode(), "text/html; charset=utf-8", PAGE_HEADERS)
        elif path == API_PATH and self.server.overview is not None:
            body = orjson.dumps(self.server.overview())
            self._send(200, body, "application/json", PAGE_HEADERS)
        elif path == TASKS_PATH or path.startswith(TASKS_PATH + "/"):
            self._tasks(path)
        elif path in ASSETS:
            body, content_type = ASSETS[path]
            self._send(200, body, content_type, PAGE_HEADERS)
        else:
            self._send(404, b"not found\n")

    def _tasks(self, path: str) -> None:
        """``/api/v1/tasks`` and ``/api/v1/tasks/<id>``; 404 with lookups off."""
        if self.server.tasks is None:
            code, answer = 404, {"error": "task lookups are off (--recent-tasks 0)"}
        else:
            code, answer = self.server.tasks(path, self.path.partition("?")[2])
        self._send(code, orjson.dumps(answer), "application/json", PAGE_HEADERS)

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
        overview: Callable[[], dict[str, Any]] | None = None,
        tasks: TaskAnswer | None = None,
    ) -> None:
        super().__init__(address, Handler)
        self.registry = registry
        self.status = status
        self.security = security
        self.overview = overview
        self.tasks = tasks

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
    overview: Callable[[], dict[str, Any]] | None = None,
    tasks: TaskAnswer | None = None,
) -> ExporterServer:
    """Start serving in a background thread; ``shutdown()`` stops it."""
    server = ExporterServer((host, port), registry, status, security, overview, tasks)
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
    """The overview page as first served: what it says before its script has run, the
    diagnosis included, so that a browser without JavaScript still shows what is wrong."""
    problem = diagnosis(status, now)
    return PAGE.substitute(
        version=html.escape(__version__),
        broker=html.escape(status.broker),
        connection="connected" if status.connected else "disconnected",
        diagnosis=html.escape(problem),
        problem_hidden="" if problem else " hidden",
    )
