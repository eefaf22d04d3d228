"""Receiving raw event messages from the broker, reconnecting forever.

``Receiver`` holds the reconnect loop; ``KombuReceiver`` consumes the event
exchange through kombu, the way Celery's own ``EventReceiver`` declares its
queue, and works for every broker kombu can fan out on. Redis gets a leaner
subscriber in ``redis_pubsub``, RabbitMQ a leaner consumer in ``amqp_reader``,
both behind the same loop; ``transport.receiver_class`` picks one for a broker URL.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
import uuid
from typing import Any, Protocol

from kombu import Connection, Consumer, Exchange, Queue
from kombu.message import Message

from ..config import Config
from ..health import Health

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 2.0
"""Reconnecting at most this far apart keeps a returning broker's blind spot under
a few seconds; an attempt against a broker that is away is one refused connect."""
POLL_SECONDS = 1.0
"""How long a read may block, so ticks and stop requests are seen at least this often."""


CERT_REQS = {
    "CERT_NONE": ssl.CERT_NONE,
    "CERT_OPTIONAL": ssl.CERT_OPTIONAL,
    "CERT_REQUIRED": ssl.CERT_REQUIRED,
}
"""``cert_reqs`` as written in the configuration, to what the ssl module takes."""

# Transport options that bound every socket read and write, per kombu driver type.
_TIMEOUT_OPTIONS = {
    "amqp": ("read_timeout", "write_timeout"),
    "redis": ("socket_timeout", "socket_connect_timeout"),
}


def broker_connection(
    config: Config, *, timeout: float | None = None, heartbeat: float = 0
) -> Connection:
    """A kombu connection with the configured transport and TLS options.

    With ``timeout``, reads and writes are bounded as well as the connect,
    so a broker that accepts and never answers costs one call, not a thread.
    """
    bounds: dict[str, float] = {} if timeout is None else {"connect_timeout": timeout}
    connection = Connection(
        config.broker_url,
        transport_options=dict(config.broker_transport_options),
        ssl={
            key: CERT_REQS.get(value, value) if key == "cert_reqs" else value
            for key, value in config.broker_ssl_options.items()
        }
        or None,
        heartbeat=heartbeat,
        **bounds,
    )
    if timeout is not None:
        for key in _TIMEOUT_OPTIONS.get(connection.transport.driver_type, ()):
            connection.transport_options.setdefault(key, timeout)
    return connection


class Sink(Protocol):
    """Where received messages go (the daemon's pipeline)."""

    def on_body(self, body: bytes, content_type: str | None, arrival: float) -> None: ...

    def on_envelope(self, data: bytes, arrival: float) -> None: ...

    def on_idle(self, now: float) -> None: ...

    def on_unreadable(self, detail: str, reason: str = ...) -> None: ...


class Receiver:
    """Runs ``consume()`` until stopped, reconnecting with capped exponential backoff."""

    connection_errors: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self, config: Config, sink: Sink, health: Health) -> None:
        self.config = config
        self.sink = sink
        self.health = health
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        delay = BACKOFF_FIRST
        self._outage_since: float | None = None
        while not self.stopping.is_set():
            self._receiving = False
            try:
                self.consume()
                return
            except self.connection_errors as exc:
                error = self.explain(exc)
                if self._receiving:
                    delay = BACKOFF_FIRST
                if self._outage_since is None:
                    self._outage_since = time.monotonic()
                    log.warning(
                        "broker %s: %s; reconnecting with backoff", self.health.broker, error
                    )
                else:
                    log.debug("broker still unreachable: %s", error)
                self.health.on_connection_lost(error)
            self.stopping.wait(delay)
            delay = min(delay * 2, BACKOFF_MAX)
            self.sink.on_idle(time.time())

    def connected(self) -> None:
        """Called by ``consume()`` once it is receiving."""
        self._receiving = True
        self.health.on_connected()
        if self._outage_since is None:
            log.info("receiving events from %s", self.health.broker)
        else:
            log.info(
                "receiving events from %s again after %.1f s",
                self.health.broker,
                time.monotonic() - self._outage_since,
            )
            self._outage_since = None

    def explain(self, exc: BaseException) -> str:
        """The error for the log; subclasses add the likely cause where they know it."""
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    def consume(self) -> None:
        """Connect, subscribe and deliver until ``stopping``; raise on connection loss."""
        raise NotImplementedError


class KombuReceiver(Receiver):
    """The event exchange through kombu: AMQP, Sentinel, filesystem and the rest."""

    def __init__(self, config: Config, sink: Sink, health: Health) -> None:
        super().__init__(config, sink, health)
        probe = self._connection()
        self.connection_errors = (
            OSError,
            *probe.connection_errors,
            *probe.channel_errors,
        )
        self.is_amqp = probe.transport.driver_type == "amqp"
        # Celery publishes events to a fanout exchange on Redis, a topic one elsewhere.
        fanout = probe.transport.driver_type == "redis"
        self.exchange = Exchange(config.events_exchange, type="fanout" if fanout else "topic")

    def _connection(self) -> Connection:
        return broker_connection(self.config, heartbeat=30)

    def _queue(self) -> Queue:
        options: dict[str, Any] = {}
        if self.is_amqp:
            # Exclusive: RabbitMQ 4 refuses transient shared queues; TTL and
            # expiry keep a stalled exporter from filling the broker.
            options = {
                "exclusive": True,
                "message_ttl": self.config.event_queue_ttl,
                "expires": self.config.event_queue_expires,
            }
        name = f"celeryev.{socket.gethostname()}.exporter.{uuid.uuid4().hex[:12]}"
        return Queue(
            name,
            exchange=self.exchange,
            routing_key="#",
            auto_delete=True,
            durable=False,
            **options,
        )

    def consume(self) -> None:
        with self._connection() as connection:
            connection.connect()
            consumer = Consumer(
                connection.default_channel,
                queues=[self._queue()],
                on_message=self._on_message,
                no_ack=True,
            )
            with consumer:
                self.connected()
                while not self.stopping.is_set():
                    try:
                        connection.drain_events(timeout=POLL_SECONDS)
                    except TimeoutError:
                        connection.heartbeat_check()
                        self.sink.on_idle(time.time())
                    except ValueError as exc:
                        # kombu's own decoding failed (the filesystem transport can
                        # read a message file mid-write): that message is lost, not us.
                        self.sink.on_unreadable(
                            f"kombu could not decode a message ({type(exc).__name__}: {exc})"
                        )

    def _on_message(self, message: Message) -> None:
        self.sink.on_body(message.body, message.content_type, time.time())
