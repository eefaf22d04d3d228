"""Worker capacity from inspect rounds, against real workers on real Redis and RabbitMQ."""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from tests.harness import InProcessExporter, scrape
from tests.servers import RabbitMQServer, RedisServer, wait_for

REPLY_QUEUE = re.compile(r"[0-9a-f]{32}\.reply\.celery\.pidbox")
REPLY_BINDINGS = "_kombu.binding.reply.celery.pidbox"


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


def value(exporter: InProcessExporter, name: str, **labels: str) -> float | None:
    """A sample's value, None when the series does not exist."""
    return exporter.daemon.registry.get_sample_value(name, labels)


def rounds(exporter: InProcessExporter) -> float:
    return exporter.sample("celery_exporter_inspect_duration_seconds_count")


def series(exporter: InProcessExporter, name: str) -> dict[frozenset, float]:
    """Every sample of a family, by its labels."""
    return {
        frozenset(sample.labels.items()): sample.value
        for family in exporter.daemon.registry.collect()
        for sample in family.samples
        if sample.name == name
    }


def start(exporters: list[InProcessExporter], url: str, *argv: str) -> InProcessExporter:
    exporter = InProcessExporter(["--broker-url", url, *argv])
    exporters.append(exporter)
    return exporter


def test_pool_sizes_prefetch_limits_and_queue_workers_match_the_workers(
    broker, worker_factory, exporters
) -> None:
    url = broker.url
    shared, only_a, orphan = unique("shared"), unique("only-a"), unique("orphan")
    a = worker_factory(url, concurrency=3, queues=(only_a, shared))
    b = worker_factory(
        url,
        pool="threads",
        concurrency=2,
        queues=(shared,),
        extra_args=("--prefetch-multiplier", "1"),
    )
    exporter = start(
        exporters,
        url,
        "--inspect-interval",
        "0.5",
        "--queues",
        orphan,
        "--worker-timeout",
        "1",
    )
    expected_workers = {only_a: 1, shared: 2, orphan: 0, "celery": 0}

    def settled() -> bool:
        workers = {q: value(exporter, "celery_queue_workers", queue=q) for q in expected_workers}
        return (
            workers == expected_workers
            and value(exporter, "celery_worker_pool_size", hostname=a.hostname) == 3
            and value(exporter, "celery_worker_pool_size", hostname=b.hostname) == 2
        )

    wait_for(settled, 60, lambda: f"capacity series: {exporter.daemon.registry.collect}")
    # Celery's prefetch count is the multiplier (4 by default) times the concurrency.
    assert value(exporter, "celery_worker_prefetch_limit", hostname=a.hostname) == 12
    assert value(exporter, "celery_worker_prefetch_limit", hostname=b.hostname) == 2
    assert series(exporter, "celery_worker_queue_info") == {
        frozenset({("hostname", a.hostname), ("queue", only_a)}): 1,
        frozenset({("hostname", a.hostname), ("queue", shared)}): 1,
        frozenset({("hostname", b.hostname), ("queue", shared)}): 1,
    }
    assert exporter.sample("celery_exporter_inspect_replies") == 2
    assert exporter.sample("celery_exporter_inspect_errors_total", {"reason": "broker"}) == 0
    assert sum(series(exporter, "celery_exporter_inspect_replies_invalid_total").values()) == 0

    # A worker that leaves takes its capacity series, and its queue coverage, with it.
    b.stop()
    wait_for(
        lambda: (
            value(exporter, "celery_worker_pool_size", hostname=b.hostname) is None
            and value(exporter, "celery_queue_workers", queue=shared) == 1
        ),
        60,
        "the stopped worker's capacity gone",
    )
    assert value(exporter, "celery_worker_prefetch_limit", hostname=b.hostname) is None
    consumers = {
        dict(labels)["hostname"] for labels in series(exporter, "celery_worker_queue_info")
    }
    assert consumers == {a.hostname}
    assert value(exporter, "celery_worker_pool_size", hostname=a.hostname) == 3


def broker_state(broker: RedisServer | RabbitMQServer) -> tuple[set[str], int]:
    """What replies could pile up in: the broker's keys or queues, and reply bindings."""
    if isinstance(broker, RedisServer):
        client = redis.Redis.from_url(broker.url)
        keys = {key.decode() for key in client.keys("*")}
        return keys, client.scard(REPLY_BINDINGS)
    names = set(broker.queues("/"))
    return names, sum(bool(REPLY_QUEUE.fullmatch(name)) for name in names)


def test_no_reply_keys_or_queues_accumulate_over_a_hundred_rounds(
    broker, worker_factory, exporters
) -> None:
    url = broker.url
    worker_factory(url, concurrency=1, queues=(unique("idle"),))
    exporter = start(exporters, url, "--inspect-interval", "0.01")
    wait_for(lambda: exporter.sample("celery_exporter_inspect_replies") == 1, 60, "a reply")
    wait_for(lambda: rounds(exporter) >= 5, 60, "five rounds")
    names, bindings = broker_state(broker)
    assert bindings == 1, names
    first = rounds(exporter)
    wait_for(lambda: rounds(exporter) >= first + 100, 120, "a hundred more rounds")
    later, later_bindings = broker_state(broker)
    # On Redis, the one reply list exists while a reply waits in it.
    assert {name for name in later ^ names if not REPLY_QUEUE.fullmatch(name)} == set()
    assert len([name for name in later if REPLY_QUEUE.fullmatch(name)]) <= 1
    assert later_bindings == 1
    assert exporter.sample("celery_exporter_inspect_replies") == 1
    assert exporter.sample("celery_exporter_inspect_errors_total", {"reason": "timeout"}) == 0

    exporter.stop()
    exporters.remove(exporter)
    wait_for(lambda: broker_state(broker)[1] == 0, 30, "the reply queue removed at stop")


def test_a_paused_worker_costs_a_round_its_timeout_and_scrapes_stay_fast(
    clean_redis, worker_factory, exporters
) -> None:
    url = clean_redis.url
    worker = worker_factory(url, concurrency=1, queues=(unique("paused"),))
    exporter = start(exporters, url, "--inspect-interval", "0.2", "--inspect-timeout", "1.5")
    host = {"hostname": worker.hostname}
    wait_for(lambda: exporter.sample("celery_worker_up", host) == 1, 60, "a heartbeat")
    wait_for(lambda: exporter.sample("celery_worker_pool_size", host) == 1, 60, "a reply")
    before = rounds(exporter)
    os.killpg(worker.pgid, signal.SIGSTOP)
    try:
        slowest, deadline = 0.0, time.monotonic() + 30
        while exporter.sample("celery_exporter_inspect_errors_total", {"reason": "timeout"}) < 2:
            started = time.perf_counter()
            scrape(exporter.url)
            slowest = max(slowest, time.perf_counter() - started)
            assert time.monotonic() < deadline, "no round timed out"
            time.sleep(0.05)
        assert slowest < 0.5, f"a scrape took {slowest:.3f} s during a stalled round"
        # The rounds went on, each ending at its timeout; the worker keeps its last values.
        timed_out = rounds(exporter) - before
        assert timed_out >= 2
        assert exporter.sample("celery_exporter_inspect_duration_seconds_sum") >= 1.5 * 2
        assert exporter.sample("celery_exporter_inspect_replies") == 0
        assert exporter.sample("celery_worker_pool_size", host) == 1
        assert exporter.sample("celery_exporter_inspect_errors_total", {"reason": "broker"}) == 0
    finally:
        os.killpg(worker.pgid, signal.SIGCONT)
    wait_for(lambda: exporter.sample("celery_exporter_inspect_replies") == 1, 30, "replies again")
