"""The fixtures themselves: private brokers answer, restart on their port, real workers work."""

from __future__ import annotations

import contextlib
import json
import socket
import uuid
from typing import Any

import kombu
import pytest
from kombu import Connection, Consumer, Exchange, Queue
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.celery_app import make_app
from tests.servers import RabbitMQServer, RedisServer, group_alive, wait_for
from tests.workers import WorkerFactory


def test_redis_publish_subscribe_round_trip(clean_redis: RedisServer) -> None:
    assert clean_redis.port not in (6379,)
    client = clean_redis.client()
    pubsub = client.pubsub()
    pubsub.subscribe("cee-test")
    wait_for(lambda: pubsub.get_message(timeout=0.1), 5, "no subscribe confirmation")
    client.publish("cee-test", b"hello")
    message = wait_for(lambda: pubsub.get_message(timeout=0.1), 5, "no message")
    assert message["data"] == b"hello"
    pubsub.close()
    client.close()


def test_redis_stop_and_start_keep_the_port(redis_server: RedisServer) -> None:
    port = redis_server.port
    client = redis_server.client(
        socket_connect_timeout=1, socket_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    client.set("before", "1")
    redis_server.stop()
    assert not redis_server.running
    with pytest.raises(Exception):  # noqa: B017 - connection errors vary with timing
        client.ping()
    redis_server.start()
    assert redis_server.port == port
    assert redis_server.url == f"redis://127.0.0.1:{port}/0"
    assert wait_for(client.ping, 5, "redis did not come back", ignore=(Exception,))
    client.close()


def test_rabbitmq_publish_and_consume(clean_rabbitmq: RabbitMQServer) -> None:
    assert clean_rabbitmq.port != 5672
    queue = Queue(
        f"cee-test-{uuid.uuid4().hex[:8]}",
        Exchange("cee-test", type="direct"),
        routing_key="k",
        auto_delete=True,
    )
    with Connection(clean_rabbitmq.url, connect_timeout=5) as connection:
        producer = connection.Producer()
        producer.publish(
            {"n": 1}, exchange=queue.exchange, routing_key="k", declare=[queue], serializer="json"
        )
        received: list[Any] = []

        def on_message(body: Any, message: kombu.Message) -> None:
            received.append(body)
            message.ack()

        def drained() -> list[Any]:
            with contextlib.suppress(TimeoutError):
                connection.drain_events(timeout=0.2)
            return received

        with Consumer(connection, [queue], callbacks=[on_message], accept=["json"]):
            wait_for(drained, 10, "the message did not come back")
    assert received == [{"n": 1}]


def _event_queue(transport: str) -> Queue:
    """A private queue bound to Celery's event exchange, as the exporter would bind it."""
    name = f"cee-test-ev-{uuid.uuid4().hex[:8]}"
    if transport == "redis":
        exchange = Exchange("celeryev", type="fanout")
        return Queue(name, exchange, routing_key="#", auto_delete=True)
    exchange = Exchange("celeryev", type="topic")
    return Queue(
        name,
        exchange,
        routing_key="#",
        auto_delete=True,
        durable=False,
        queue_arguments={"x-expires": 60000},
    )


def _decode(message: kombu.Message) -> list[dict[str, Any]]:
    body = message.body
    if isinstance(body, bytes):
        body = body.decode()
    events = json.loads(body) if isinstance(body, str) else body
    return events if isinstance(events, list) else [events]


def _wait_subscribed(connection: Connection, server: RedisServer) -> None:
    """Kombu sends Redis PSUBSCRIBE on the first drain: events published before are lost."""
    client = server.client()

    def subscribed() -> bool:
        with contextlib.suppress(TimeoutError):
            connection.drain_events(timeout=0.05)
        return client.pubsub_numpat() >= 1

    try:
        wait_for(subscribed, 10, "the event consumer never subscribed")
    finally:
        client.close()


def test_a_real_worker_sends_task_events(
    broker: RedisServer | RabbitMQServer,
    worker_factory: WorkerFactory,
) -> None:
    transport = "redis" if isinstance(broker, RedisServer) else "amqp"
    queue = _event_queue(transport)
    events: list[dict[str, Any]] = []

    def on_message(message: kombu.Message) -> None:
        events.extend(_decode(message))
        message.ack()

    with Connection(broker.url, connect_timeout=5) as connection:
        channel = connection.channel()
        with Consumer(channel, [queue], on_message=on_message, accept=["json"]):
            if isinstance(broker, RedisServer):
                _wait_subscribed(connection, broker)
            worker = worker_factory(broker.url, concurrency=1)
            app = make_app(broker.url)
            try:
                result = app.send_task("tests.add", (2, 3))
            finally:
                app.close()

            def succeeded() -> dict[str, Any] | None:
                with contextlib.suppress(TimeoutError):
                    connection.drain_events(timeout=0.2)
                return next(
                    (
                        e
                        for e in events
                        if e.get("type") == "task-succeeded" and e.get("uuid") == result.id
                    ),
                    None,
                )

            event = wait_for(
                succeeded,
                30,
                lambda: (
                    f"no task-succeeded for {result.id}; "
                    f"event types seen: {sorted({e.get('type') for e in events})}"
                ),
            )
    assert event["hostname"] == worker.hostname
    assert event["result"] == "5"
    types = {e.get("type") for e in events if e.get("uuid") == result.id}
    assert {"task-sent", "task-received", "task-started"} <= types


def _children(pid: int) -> list[int]:
    path = f"/proc/{pid}/task/{pid}/children"
    try:
        with open(path) as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def test_kill_leaves_no_worker_process(
    clean_redis: RedisServer,
    worker_factory: WorkerFactory,
) -> None:
    worker = worker_factory(clean_redis.url, concurrency=2)
    pool = wait_for(
        lambda: len(_children(worker.pid)) >= 2 and _children(worker.pid),
        10,
        "the prefork pool did not start",
    )
    assert worker.hostname == worker.name.replace("%h", socket.gethostname())
    worker.kill()
    assert not worker.running
    assert not group_alive(worker.pgid)
    assert not any(_alive(pid) for pid in [worker.pid, *pool])
    assert "worker: Warm shutdown" not in worker.log_text()


def test_fresh_vhost_is_empty_and_usable(fresh_vhost: str, rabbitmq_server: RabbitMQServer) -> None:
    name = f"cee-test-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    with Connection(fresh_vhost, connect_timeout=5) as connection:
        connection.Producer().publish(
            {"n": 1}, exchange=queue.exchange, routing_key=name, declare=[queue], serializer="json"
        )
    vhost = fresh_vhost.rsplit("/", 1)[1]
    assert rabbitmq_server.queues(vhost) == [name]
    assert name not in rabbitmq_server.queues("/")
