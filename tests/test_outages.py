"""Broker outages: the exporter keeps serving, says it is disconnected, and carries on.

Each test has brokers of its own, since it stops them. Events are published
straight to the broker (kombu's Redis envelope, or a kombu producer on the
``celeryev`` topic exchange) so the counts are exact: a worker would
reconnect and resend on its own schedule.
"""

from __future__ import annotations

import base64
import itertools
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import orjson
import pytest
import redis
from kombu import Connection, Exchange, Producer

from tests.harness import InProcessExporter, parse, scrape
from tests.servers import RabbitMQServer, RedisServer, wait_for

OUTAGE_SECONDS = 8.0
"""Long enough for the reconnect backoff to reach its cap (0.5 + 1 + 2 + 2 ... s)."""
RETURN_DEADLINE = 10.0
"""Generous bound for reconnecting after the broker is back; the design target is 5 s."""
CONNECTED = "celery_exporter_broker_connected"
SENT = "celery_task_sent_total"

_uuids = itertools.count()


def sent_events(count: int, name: str) -> list[dict]:
    now = time.time()
    return [
        {
            "type": "task-sent",
            "timestamp": now,
            "hostname": "gen@client",
            "uuid": f"outage-{next(_uuids)}",
            "name": name,
            "queue": "celery",
        }
        for _ in range(count)
    ]


def publish_redis(url: str, events: list[dict]) -> None:
    body = orjson.dumps(events)
    envelope = orjson.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {},
            "properties": {
                "body_encoding": "base64",
                "delivery_info": {"exchange": "celeryev", "routing_key": "task.multi"},
            },
        }
    )
    with redis.Redis.from_url(url) as client:
        assert client.publish("/0.celeryev/task.multi", envelope) == 1  # one subscriber: us


def publish_amqp(url: str, events: list[dict]) -> None:
    with Connection(url) as connection:
        producer = Producer(connection.channel(), exchange=Exchange("celeryev", type="topic"))
        producer.publish(
            orjson.dumps(events),
            routing_key="task.multi",
            content_type="application/json",
            content_encoding="utf-8",
        )


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def own_rabbitmq() -> Iterator[RabbitMQServer]:
    with RabbitMQServer() as server:
        yield server


def status_of(url: str, path: str) -> int:
    try:
        with urllib.request.urlopen(url + path, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_counted(exporter: InProcessExporter, name: str, count: int) -> None:
    wait_for(
        lambda: exporter.sample(SENT, {"name": name, "queue": "celery"}) == count,
        15,
        f"{name}: {count} task-sent events not counted",
    )


def ride_out_an_outage(
    server: RedisServer | RabbitMQServer, url: str, publish: Callable[[str, list[dict]], None]
) -> float:
    """Events before, an outage, events after: exact totals. Returns the reconnect time."""
    exporter = InProcessExporter(["--broker-url", url])
    try:
        wait_for(lambda: exporter.sample(CONNECTED) == 1, 15, "never connected")
        publish(url, sent_events(40, "before"))
        wait_counted(exporter, "before", 40)

        server.stop()
        wait_for(lambda: exporter.sample(CONNECTED) == 0, 10, "the outage went unnoticed")
        assert status_of(exporter.url, "/readyz") == 503
        assert status_of(exporter.url, "/healthz") == 200
        samples = parse(scrape(exporter.url))
        assert samples[(CONNECTED, frozenset())] == 0
        assert samples[(SENT, frozenset({("name", "before"), ("queue", "celery")}))] == 40
        time.sleep(OUTAGE_SECONDS)  # the outage itself: nothing to wait for but time
        assert status_of(exporter.url, "/metrics") == 200

        server.start()
        back = time.monotonic()
        wait_for(
            lambda: exporter.sample(CONNECTED) == 1,
            RETURN_DEADLINE,
            "not reconnected after the broker came back",
        )
        reconnect = time.monotonic() - back
        assert status_of(exporter.url, "/readyz") == 200
        publish(url, sent_events(25, "after"))
        publish(url, sent_events(15, "before"))
        wait_counted(exporter, "after", 25)
        wait_counted(exporter, "before", 55)
        assert exporter.sample("celery_exporter_events_total", {"type": "task-sent"}) == 80
        assert exporter.sample("celery_exporter_broker_reconnects_total") == 1
        return reconnect
    finally:
        exporter.stop()


def test_redis_outage(own_redis: RedisServer) -> None:
    reconnect = ride_out_an_outage(own_redis, own_redis.url, publish_redis)
    print(f"redis: events count again {reconnect:.2f} s after the broker's return")


def test_rabbitmq_outage(own_rabbitmq: RabbitMQServer) -> None:
    reconnect = ride_out_an_outage(own_rabbitmq, own_rabbitmq.url, publish_amqp)
    print(f"rabbitmq: events count again {reconnect:.2f} s after the broker's return")


def test_a_quick_restart_is_an_outage_too(own_redis: RedisServer) -> None:
    """Without redis-py's own retries, even a restart in a blink shows and is counted."""
    url = own_redis.url
    exporter = InProcessExporter(["--broker-url", url])
    try:
        wait_for(lambda: exporter.sample(CONNECTED) == 1, 15, "never connected")
        own_redis.stop()
        own_redis.start()
        wait_for(
            lambda: exporter.sample("celery_exporter_broker_reconnects_total") == 1,
            10,
            "the restart was not counted",
        )
        wait_for(lambda: exporter.sample(CONNECTED) == 1, RETURN_DEADLINE, "not reconnected")
        publish_redis(url, sent_events(7, "restart"))
        wait_counted(exporter, "restart", 7)
    finally:
        exporter.stop()


@pytest.mark.parametrize("kind", ["redis", "rabbitmq"])
def test_a_broker_absent_at_start_is_waited_for(kind: str, request: pytest.FixtureRequest) -> None:
    server = request.getfixturevalue(f"own_{kind}")
    url = server.url
    publish = publish_redis if kind == "redis" else publish_amqp
    server.stop()
    exporter = InProcessExporter(["--broker-url", url])
    try:
        wait_for(lambda: exporter.daemon.health.last_error != "", 10, "no connection attempt")
        assert exporter.sample(CONNECTED) == 0
        assert status_of(exporter.url, "/readyz") == 503
        assert status_of(exporter.url, "/healthz") == 200
        assert status_of(exporter.url, "/metrics") == 200
        server.start()
        wait_for(
            lambda: exporter.sample(CONNECTED) == 1,
            RETURN_DEADLINE,
            "not connected once the broker started",
        )
        publish(url, sent_events(12, "late"))
        wait_counted(exporter, "late", 12)
        assert exporter.sample("celery_exporter_broker_reconnects_total") == 0
    finally:
        exporter.stop()
