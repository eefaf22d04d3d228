"""Queue backlog and consumers, probed on the suite's real Redis and RabbitMQ."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from exporter.probes.queues import redis_keys
from tests.celery_app import make_app
from tests.harness import InProcessExporter, scrape
from tests.servers import SilentServer, free_port, wait_for

POLL = ("--queue-poll-interval", "0.2")


def unique(prefix: str) -> str:
    """A queue name no other test uses: the brokers are shared by the session."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def exporters() -> Iterator[list[InProcessExporter]]:
    """Exporters started by a test, stopped whatever happens."""
    started: list[InProcessExporter] = []
    yield started
    for exporter in started:
        exporter.stop()


def length(exporter: InProcessExporter, queue: str) -> float | None:
    return exporter.daemon.registry.get_sample_value("celery_queue_length", {"queue": queue})


def wait_length(exporter: InProcessExporter, queue: str, expected: int) -> None:
    wait_for(
        lambda: length(exporter, queue) == expected,
        30,
        f"celery_queue_length{{queue={queue!r}}} == {expected}",
    )


def publish(
    broker_url: str, queue: str, count: int, priority: int | None = None, **conf: object
) -> None:
    """``count`` tasks on ``queue``, with no sent events: only the probe can see them."""
    with make_app(broker_url, sent_events=False) as app:
        app.conf.update(conf)
        for number in range(count):
            app.send_task("tests.add", (number, 1), queue=queue, priority=priority)


def test_length_counts_waiting_tasks_and_returns_to_0_once_drained(
    broker,
    worker_factory,
    exporters,
) -> None:
    url = broker.url
    queue = unique("backlog")
    publish(url, queue, 7)
    exporter = InProcessExporter(["--broker-url", url, "--queues", queue, *POLL])
    exporters.append(exporter)
    wait_length(exporter, queue, 7)
    assert exporter.sample("celery_exporter_queue_probe_errors_total", {"queue": queue}) == 0
    assert (
        exporter.daemon.registry.get_sample_value(
            "celery_exporter_queue_probe_errors_total", {"queue": "celery"}
        )
        == 0
    )

    worker_factory(url, queues=(queue,))
    wait_length(exporter, queue, 0)


def test_redis_priority_sub_queues_are_counted(clean_redis, exporters) -> None:
    queue = unique("prio")
    for priority, count in ((None, 2), (3, 1), (5, 1), (9, 1)):
        publish(
            clean_redis.url,
            queue,
            count,
            priority,
            broker_transport_options={"queue_order_strategy": "priority"},
        )
    client = redis.Redis.from_url(clean_redis.url)
    # Only two sit in the queue's own list: the rest are in its priority sub-lists.
    assert client.llen(queue) == 2
    assert sum(client.llen(key) for key in redis_keys(queue, {})) == 5

    exporter = InProcessExporter(["--broker-url", clean_redis.url, "--queues", queue, *POLL])
    exporters.append(exporter)
    wait_length(exporter, queue, 5)


def test_redis_global_keyprefix_is_honoured(clean_redis, exporters) -> None:
    queue, prefix = unique("prefixed"), unique("app") + ":"
    publish(clean_redis.url, queue, 4, broker_transport_options={"global_keyprefix": prefix})
    assert redis.Redis.from_url(clean_redis.url).llen(prefix + queue) == 4

    exporter = InProcessExporter(
        [
            "--broker-url",
            clean_redis.url,
            "--queues",
            queue,
            *POLL,
            "--broker-transport-option",
            f"global_keyprefix={prefix}",
        ]
    )
    exporters.append(exporter)
    wait_length(exporter, queue, 4)


def test_queues_named_by_task_sent_events_are_probed(broker, exporters) -> None:
    url = broker.url
    queue = unique("sent")
    exporter = InProcessExporter(["--broker-url", url, *POLL])
    exporters.append(exporter)
    wait_for(lambda: exporter.daemon.health.connected, 30, "the exporter receiving events")
    app = make_app(url, sent_events=True)
    for number in range(3):
        app.send_task("tests.add", (number, 1), queue=queue)
    wait_for(
        lambda: exporter.total("celery_task_sent_total", queue=queue) == 3,
        30,
        "three task-sent events",
    )
    wait_length(exporter, queue, 3)


def test_a_queue_that_does_not_exist_reads_0(broker, exporters) -> None:
    url = broker.url
    # Probed in name order: the missing queue first, so a probe follows its NOT_FOUND.
    missing, present = unique("a-missing"), unique("b-present")
    publish(url, present, 2)
    exporter = InProcessExporter(["--broker-url", url, "--queues", f"{missing},{present}", *POLL])
    exporters.append(exporter)
    wait_length(exporter, present, 2)
    assert length(exporter, missing) == 0
    assert exporter.sample("celery_exporter_queue_probe_errors_total", {"queue": missing}) == 0


def test_rabbitmq_consumers_count_a_running_worker(
    clean_rabbitmq,
    worker_factory,
    exporters,
) -> None:
    queue = unique("consumed")
    publish(clean_rabbitmq.url, queue, 1)
    exporter = InProcessExporter(["--broker-url", clean_rabbitmq.url, "--queues", queue, *POLL])
    exporters.append(exporter)
    consumers = {"queue": queue}
    wait_for(
        lambda: exporter.daemon.registry.get_sample_value("celery_queue_consumers", consumers) == 0,
        30,
        "no consumer yet",
    )

    worker = worker_factory(clean_rabbitmq.url, queues=(queue,))
    try:
        wait_for(
            lambda: exporter.sample("celery_queue_consumers", consumers) == 1, 30, "one consumer"
        )
        wait_length(exporter, queue, 0)
    finally:
        worker.stop()
    wait_for(
        lambda: exporter.sample("celery_queue_consumers", consumers) == 0,
        30,
        "no consumer after the worker stopped",
    )


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_a_broker_that_is_down_counts_errors_and_the_daemon_keeps_serving(
    scheme: str,
    exporters,
) -> None:
    url = f"{scheme}://127.0.0.1:{free_port()}/"  # nothing listens there
    exporter = InProcessExporter(["--broker-url", url, "--queues", "jobs", *POLL])
    exporters.append(exporter)
    errors = {"queue": "jobs"}
    wait_for(
        lambda: exporter.sample("celery_exporter_queue_probe_errors_total", errors) >= 2,
        30,
        "two failed probes",
    )
    assert length(exporter, "jobs") is None
    assert "celery_exporter_queue_probe_errors_total" in scrape(exporter.url)


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_a_scrape_answers_while_a_probe_hangs(scheme: str, exporters) -> None:
    silent = SilentServer()
    try:
        exporter = InProcessExporter(
            [
                "--broker-url",
                f"{scheme}://127.0.0.1:{silent.port}/",
                "--queue-probe-timeout",
                "60",
                *POLL,
            ]
        )
        exporters.append(exporter)
        # The event receiver and the probe both connected, and neither gets an answer.
        wait_for(lambda: len(silent.accepted) >= 2, 30, "the probe connecting")
        assert "celery_exporter_queue_probe_errors_total" in scrape(exporter.url)
        assert exporter.sample("celery_exporter_queue_probe_errors_total", {"queue": "celery"}) == 0
    finally:
        silent.close()  # the hanging probe fails at once, so the exporter stops promptly
