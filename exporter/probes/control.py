"""Celery's remote control, spoken through kombu's pidbox: broadcasts and their replies.

Celery's ``celery control`` and ``celery inspect`` publish a command to the
``celery.pidbox`` fanout exchange; workers that must answer publish their
reply to the ``reply.celery.pidbox`` exchange, routed to the asker's reply
queue and tagged with the command's ticket. ``ControlClient`` speaks that
protocol with kombu alone, so Celery is not needed at run time, and keeps
ONE reply queue for its whole life: kombu's ``Mailbox`` names its reply queue
after the object that asks, so a client that binds a new one per call leaves
a queue (on Redis, a binding and a list of late replies) behind every time.

Two jobs use it: ``EventsEnabler`` here, which broadcasts ``enable_events``,
and ``exporter.probes.inspection``, which asks for ``stats`` and ``active_queues``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from kombu import Connection, Consumer, Producer, Queue
from kombu.message import Message
from kombu.pidbox import Mailbox

from ..broker.receiver import broker_connection
from ..config import Config
from .periodic import Periodic

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
"""Seconds a broadcast may spend connecting to, reading from or writing to the broker."""
DRAIN_SLICE = 0.25
"""Replies are awaited in slices this long, so a stop request is seen within one."""

# Celery's default control_exchange, serialised as every worker accepts.
MAILBOX = Mailbox("celery", type="fanout", serializer="json")

OnReply = Callable[[str, Message], bool]
"""Given the command a reply answers and the raw reply: True once no more are needed."""


class ControlClient:
    """A broker connection for control commands, with one reply queue for its whole life.

    Not thread-safe: one job's thread uses it. Any broker error propagates;
    the caller ``close()``s the client, and the next call connects again and
    declares the same reply queue.
    """

    def __init__(self, config: Config, timeout: float) -> None:
        self.config = config
        self.timeout = timeout
        self.oid = uuid.uuid4().hex
        # As kombu's own reply queue: RabbitMQ drops it with the connection, and on
        # Redis (kombu 5.7+) its binding expires unless a consumer refreshes it.
        self.reply_queue = Queue(
            f"{self.oid}.{MAILBOX.reply_exchange.name}",
            exchange=MAILBOX.reply_exchange,
            routing_key=self.oid,
            durable=False,
            auto_delete=True,
            exclusive=True,
            expires=MAILBOX.reply_queue_expires,
        )
        self._connection: Connection | None = None
        self._consumer: Consumer | None = None
        self._tickets: dict[str, str] = {}
        self._on_reply: OnReply | None = None
        self._done = False

    def broadcast(self, command: str, *, expires: float) -> None:
        """Send ``command`` to every worker, without asking for replies."""
        self._publish(self._connect(), command, None, expires)

    def ask(
        self, commands: Sequence[str], timeout: float, on_reply: OnReply, stop: threading.Event
    ) -> None:
        """Broadcast ``commands`` and hand each reply to ``on_reply`` for ``timeout`` seconds.

        It ends earlier once ``on_reply`` returns True, or when ``stop`` is set.
        Replies to earlier calls (late ones) are dropped unread.
        """
        deadline = time.monotonic() + timeout
        connection = self._connect(replies=True)
        self._tickets = {uuid.uuid4().hex: command for command in commands}
        self._on_reply, self._done = on_reply, False
        try:
            for ticket, command in self._tickets.items():
                self._publish(connection, command, ticket, timeout)
            while not self._done and not stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    connection.drain_events(timeout=min(remaining, DRAIN_SLICE))
                except TimeoutError:
                    continue
        finally:
            self._tickets, self._on_reply = {}, None

    def close(self) -> None:
        """Drop the reply queue (on Redis its binding stays otherwise) and disconnect."""
        connection, self._connection = self._connection, None
        consumer, self._consumer = self._consumer, None
        if connection is None:
            return
        try:
            if consumer is not None:
                consumer.channel.queue_delete(self.reply_queue.name)
        except Exception as exc:  # the connection is gone already
            log.debug("deleting the reply queue: %s", exc)
        try:
            connection.release()
        except Exception as exc:
            log.debug("closing the control connection: %s", exc)

    def _connect(self, *, replies: bool = False) -> Connection:
        connection = self._connection
        if connection is None:
            connection = broker_connection(self.config, timeout=self.timeout)
            try:
                connection.ensure_connection(max_retries=0)
            except BaseException:
                connection.release()
                raise
            self._connection = connection
        if replies and self._consumer is None:
            # no_ack: nothing to redeliver; the message is judged by on_reply, not decoded here.
            consumer = Consumer(
                connection.channel(),
                queues=[self.reply_queue],
                on_message=self._deliver,
                no_ack=True,
            )
            consumer.consume()
            self._consumer = consumer
        return connection

    def _publish(
        self, connection: Connection, command: str, ticket: str | None, expires: float
    ) -> None:
        """The message ``celery control`` / ``celery inspect`` send (kombu's Mailbox format)."""
        body: dict[str, Any] = {
            "method": command,
            "arguments": {},
            "destination": None,
            "pattern": None,
            "matcher": None,
        }
        if ticket is not None:
            body["ticket"] = ticket
            body["reply_to"] = {"exchange": MAILBOX.reply_exchange.name, "routing_key": self.oid}
        Producer(connection.default_channel, auto_declare=False).publish(
            body,
            exchange=MAILBOX.exchange,
            declare=[MAILBOX.exchange],
            headers={"clock": MAILBOX.clock.forward(), "expires": time.time() + expires},
            serializer="json",
        )

    def _deliver(self, message: Message) -> None:
        command = self._tickets.get(message.headers.get("ticket"))
        if command is not None and self._on_reply is not None and not self._done:
            self._done = self._on_reply(command, message)


class EventsEnabler(Periodic):
    """Broadcasts ``enable_events`` to every worker, now and every interval.

    Connects for each broadcast: one every interval is not worth a connection
    kept open.
    """

    name = "enable-events"

    def __init__(self, config: Config) -> None:
        super().__init__(config.enable_events_interval)
        self.config = config
        self._failing = False

    def run_once(self) -> None:
        control = ControlClient(self.config, CONNECT_TIMEOUT)
        try:
            # Valid until the next one is due (at least Celery's own 1 s), so a
            # busy worker or one whose clock is a little off does not drop it.
            control.broadcast("enable_events", expires=max(self.interval, 1.0))
        except Exception as exc:
            if not self._failing:
                self._failing = True
                log.warning(
                    "could not broadcast enable_events: %s: %s; retrying every %g s",
                    type(exc).__name__,
                    exc,
                    self.interval,
                )
            return
        finally:
            control.close()
        if self._failing:
            self._failing = False
            log.info("broadcasting enable_events again")
        log.debug("broadcast enable_events")
