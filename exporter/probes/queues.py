"""Queue backlog from the broker: messages waiting and consumers, per queue.

The event stream cannot tell how many messages wait unconsumed, so the
broker is asked, every ``--queue-poll-interval`` seconds on the poller's own
thread; a scrape only reads the gauges it wrote. Each probe is bounded by
``--queue-probe-timeout``. While a queue's probe fails, its length and
consumer series are removed rather than left at a stale value, and
``celery_exporter_queue_probe_errors_total`` counts the failures.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from kombu.exceptions import ChannelError
from kombu.transport.redis import PRIORITY_STEPS
from kombu.transport.redis import Channel as RedisChannel
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..broker import redis_pubsub
from ..broker.receiver import broker_connection
from ..config import Config
from ..telemetry.metrics import Metrics
from .periodic import Periodic

log = logging.getLogger(__name__)


class Probe(Protocol):
    """Measures one queue: messages waiting, and consumers where the broker knows them."""

    def measure(self, queue: str) -> tuple[int, int | None]: ...

    def close(self) -> None: ...


def redis_keys(queue: str, transport_options: Mapping[str, Any]) -> list[str]:
    """The lists kombu keeps a queue in: one per priority step (kombu's ``_q_for_pri``)."""
    prefix = transport_options.get("global_keyprefix", "")
    sep = transport_options.get("sep", RedisChannel.sep)
    steps = transport_options.get("priority_steps", PRIORITY_STEPS)
    return [f"{prefix}{queue}{sep}{step}" if step else f"{prefix}{queue}" for step in steps]


class RedisProbe:
    """LLEN of the queue's lists, in one round trip; Redis does not know consumers."""

    def __init__(self, config: Config, timeout: float) -> None:
        self._transport_options = config.broker_transport_options
        # One attempt per probe: redis-py's own retries would multiply the timeout.
        self._client = redis_pubsub.client_for(
            config,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )

    def measure(self, queue: str) -> tuple[int, int | None]:
        pipe = self._client.pipeline(transaction=False)
        for key in redis_keys(queue, self._transport_options):
            pipe.llen(key)
        return sum(pipe.execute()), None

    def close(self) -> None:
        self._client.close()


class KombuProbe:
    """A passive queue declare: RabbitMQ's message and consumer counts, or the count
    kombu's virtual transports (Sentinel, filesystem) keep themselves."""

    def __init__(self, config: Config, timeout: float) -> None:
        self._connection = broker_connection(config, timeout=timeout)
        self._has_consumers = self._connection.transport.driver_type == "amqp"
        self._channel: Any = None

    def measure(self, queue: str) -> tuple[int, int | None]:
        if self._channel is None:
            self._connection.ensure_connection(max_retries=0)
            self._channel = self._connection.channel()
        try:
            _, messages, consumers = self._channel.queue_declare(queue=queue, passive=True)
        except ChannelError as exc:
            if str(exc.reply_code) != "404":
                raise
            # A queue that does not exist holds nothing; RabbitMQ has closed the channel.
            channel, self._channel = self._channel, None
            channel.close()
            messages = consumers = 0
        return messages, consumers if self._has_consumers else None

    def close(self) -> None:
        self._connection.release()


def probe_class(broker_url: str) -> Callable[[Config, float], Probe]:
    """The probe for a broker URL, built with the config and a timeout in seconds."""
    return RedisProbe if redis_pubsub.handles(broker_url) else KombuProbe


class QueuePoller(Periodic):
    """Probes every known queue each interval and writes the queue gauges."""

    name = "queue-poller"

    def __init__(
        self, config: Config, metrics: Metrics, queues_seen: Callable[[], Iterable[str]]
    ) -> None:
        # A probe in flight ends within its timeouts: connect, read, close.
        super().__init__(config.queue_poll_interval)
        self.config = config
        self._queues_seen = queues_seen
        self._new_probe = probe_class(config.broker_url)
        self._probe: Probe | None = None
        self._failing: set[str] = set()
        self._length = metrics.gauge("celery_queue_length")
        self._consumers = metrics.gauge("celery_queue_consumers")
        self._errors = metrics.counter("celery_exporter_queue_probe_errors_total")
        self._duration = metrics.histogram("celery_exporter_queue_probe_duration_seconds")

    def queues(self) -> list[str]:
        """Configured queues, the default queue, and those task-sent events named."""
        return sorted({*self.config.queues, self.config.default_queue, *self._queues_seen()})

    def run_once(self) -> None:
        for queue in self.queues():
            if self.stopping.is_set():
                return
            self._errors.inc((queue,), 0)
            started = time.perf_counter()
            try:
                if self._probe is None:
                    self._probe = self._new_probe(self.config, self.config.queue_probe_timeout)
                length, consumers = self._probe.measure(queue)
            except Exception as exc:
                self._duration.observe((), time.perf_counter() - started)
                self._failed(queue, exc)
                continue
            self._duration.observe((), time.perf_counter() - started)
            self._length.set((queue,), length)
            if consumers is not None:
                self._consumers.set((queue,), consumers)
            if queue in self._failing:
                self._failing.discard(queue)
                log.info("queue %s: probe succeeds again", queue)

    def _failed(self, queue: str, exc: Exception) -> None:
        self._errors.inc((queue,))
        self._length.remove((queue,))
        self._consumers.remove((queue,))
        self.close()  # start over with a fresh connection
        if queue not in self._failing:
            self._failing.add(queue)
            log.warning(
                "queue %s: probe failed: %s: %s; further failures are only counted in "
                "celery_exporter_queue_probe_errors_total until it succeeds",
                queue,
                type(exc).__name__,
                exc,
            )

    def close(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            try:
                probe.close()
            except Exception as exc:  # the connection is gone already
                log.debug("closing the queue probe: %s", exc)
