"""The Redis event stream read straight from pub/sub.

On Redis, Celery's events are not queued: kombu PUBLISHes each one to the
channel ``<global_keyprefix>/<db>.celeryev/<routing key>``, and a subscriber
that falls behind is disconnected once its output buffer passes Redis'
``client-output-buffer-limit pubsub`` (32 MB by default). Going through
kombu's consumer costs ~18 µs a message before any work; redis-py's
``get_message()`` still several. Here redis-py only connects, and the
subscription is read in bulk with hiredis, under a microsecond a message,
which is what keeps the exporter ahead of bursts. The kombu transport options that shape
channel names are honoured, so this reads exactly what kombu would.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import hiredis
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..config import Config
from .receiver import CERT_REQS, POLL_SECONDS, Receiver

SCHEMES = ("redis", "rediss")
READ_BYTES = 1 << 14
"""One recv() takes up to this much of a backlog, dozens of events. Not more: hiredis
moves its unread bytes forward after each reply, so a bigger feed costs more per reply."""
_CLIENT_OPTIONS = ("socket_connect_timeout", "socket_keepalive", "health_check_interval")


def handles(url: str) -> bool:
    return url.partition("://")[0] in SCHEMES and ";" not in url


def client_for(config: Config, **extra: Any) -> redis.Redis:
    """A redis-py client for the broker URL with kombu's transport and TLS options."""
    options: dict[str, Any] = {"socket_connect_timeout": 5.0, "socket_keepalive": True}
    transport = config.broker_transport_options
    options.update({key: transport[key] for key in _CLIENT_OPTIONS if key in transport})
    if config.broker_url.startswith("rediss://"):
        for key, value in config.broker_ssl_options.items():
            name = key if key.startswith("ssl_") else f"ssl_{key}"
            options[name] = CERT_REQS.get(value, value) if name == "ssl_cert_reqs" else value
    options.update(extra)
    return redis.Redis.from_url(config.broker_url, **options)


def event_channel(config: Config, db: int) -> tuple[str, bool]:
    """The channel (or pattern) kombu publishes events to, and whether it is a pattern."""
    transport = config.broker_transport_options
    prefix = transport.get("fanout_prefix", True)
    if prefix is True:
        prefix = f"/{db}."
    elif not prefix:
        prefix = ""
    channel = f"{transport.get('global_keyprefix', '')}{prefix}{config.events_exchange}"
    if transport.get("fanout_patterns", True):
        return f"{channel}/*", True
    return channel, False


class RedisReceiver(Receiver):
    """Subscribes to the event channel and hands each kombu envelope on."""

    connection_errors = (redis.ConnectionError, redis.TimeoutError, OSError)

    def consume(self) -> None:
        # No redis-py retries: its silent reconnects would hide an outage from
        # /readyz, and the receive loop already reconnects on its own schedule.
        client = client_for(self.config, retry=Retry(NoBackoff(), 0))
        db = client.connection_pool.connection_kwargs.get("db", 0)
        channel, is_pattern = event_channel(self.config, db)
        connection = client.connection_pool.get_connection()
        try:
            # redis-py connects (TLS, AUTH, SELECT); the subscription's replies are
            # then read in bulk from its socket with a parser of our own, one recv()
            # for many messages, which costs a fraction of get_message() per event.
            connection.send_command("PSUBSCRIBE" if is_pattern else "SUBSCRIBE", channel)
            self._read(connection._sock)
        finally:
            connection.disconnect()
            client.close()

    def _read(self, sock: socket.socket) -> None:
        """Deliver each published message's data until ``stopping``; raise on loss."""
        reader = hiredis.Reader()
        buffer = bytearray(READ_BYTES)
        on_envelope, on_idle, stopping = self.sink.on_envelope, self.sink.on_idle, self.stopping
        sock.settimeout(POLL_SECONDS)
        while not stopping.is_set():
            try:
                size = sock.recv_into(buffer)
            except TimeoutError:
                on_idle(time.time())
                continue
            if not size:
                raise redis.ConnectionError("Connection closed by server.")
            reader.feed(buffer, 0, size)
            arrival = time.time()
            reply = reader.gets()
            while reply is not False:
                kind = reply[0] if isinstance(reply, list) else None  # RESP3: a subclass
                if kind == b"pmessage":
                    on_envelope(reply[3], arrival)
                elif kind == b"message":
                    on_envelope(reply[2], arrival)
                elif kind in (b"psubscribe", b"subscribe"):
                    self.connected()
                else:
                    raise redis.ConnectionError(f"unexpected reply {reply!r:.200}")
                reply = reader.gets()

    def explain(self, exc: BaseException) -> str:
        text = super().explain(exc)
        if self._receiving and "closed by server" in str(exc):
            text += (
                " (Redis drops a subscriber whose output buffer passes "
                "client-output-buffer-limit pubsub: the exporter fell behind the events)"
            )
        return text
