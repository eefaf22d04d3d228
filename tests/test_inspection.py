"""Worker capacity from inspect rounds, against real workers on real Redis and RabbitMQ."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from exporter.probes.control import MAILBOX
from exporter.probes.inspection import Inspector
from tests import test_queues
from tests.celery_app import make_app
from tests.harness import InProcessExporter, scrape
from tests.servers import RabbitMQServer, RedisServer, SilentServer, free_port, wait_for
from tests.test_hostile_input import pickle_trap
from tests.test_queues import unique

REPLY_QUEUE = re.compile(r"[0-9a-f]{32}\.reply\.celery\.pidbox")
REPLY_BINDINGS = "_kombu.binding.reply.celery.pidbox"
exporters = test_queues.exporters  # the fixture: exporters a test starts, stopped after it


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

    wait_for(
        settled,
        60,
        lambda: (
            f"pool sizes {series(exporter, 'celery_worker_pool_size')}, "
            f"queue workers {series(exporter, 'celery_queue_workers')}"
        ),
    )
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
    broker, worker_factory, exporters
) -> None:
    url = broker.url
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


class HostileWorker:
    """A peer on the control exchange that answers every inspect command with ``replies``.

    It speaks the pidbox protocol as a worker does (a queue bound to the
    ``celery.pidbox`` fanout, replies to ``reply_to`` with the ticket), but
    what it sends is whatever the test wants: ``replies(command)`` gives
    ``(body bytes, content type)`` pairs, published as they are.
    """

    def __init__(self, url: str, replies: Callable[[str], list[tuple[bytes, str]]]) -> None:
        self.replies = replies
        self.stopping = threading.Event()
        self.answered = 0
        self._connection = Connection(url)
        queue = Queue(
            f"hostile-{uuid.uuid4().hex[:8]}.celery.pidbox",
            exchange=MAILBOX.exchange,
            auto_delete=True,
            durable=False,
            exclusive=True,
        )
        self._consumer = Consumer(
            self._connection.channel(), [queue], on_message=self._answer, no_ack=True
        )
        self._consumer.consume()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                self._connection.drain_events(timeout=0.2)

    def _answer(self, message: Any) -> None:
        request = json.loads(message.body)
        reply_to = request.get("reply_to")
        if not reply_to:
            return
        exchange = Exchange(reply_to["exchange"], type="direct", durable=False)
        producer = Producer(self._connection.default_channel)
        for body, content_type in self.replies(request["method"]):
            producer.publish(
                body,
                exchange=exchange,
                routing_key=reply_to["routing_key"],
                headers={"ticket": request["ticket"]},
                content_type=content_type,
                content_encoding="binary",
            )
        self.answered += 1

    def stop(self) -> None:
        self.stopping.set()
        self._thread.join(5)
        self._connection.release()


def hostile_replies(trap: Path, crowd: int) -> Callable[[str], list[tuple[bytes, str]]]:
    """Every kind of bad reply, and a crowd of unknown workers answering well."""
    ok_stats = {"pool": {"max-concurrency": 4}, "prefetch_count": 16}
    json_type = "application/json"

    def replies(command: str) -> list[tuple[bytes, str]]:
        if command == "stats":
            bad = [
                {"text@hostile": {"pool": {"max-concurrency": "4"}, "prefetch_count": "16"}},
                {"nopool@hostile": {"prefetch_count": 16}},
                {"notadict@hostile": "stats"},
            ]
            good = ok_stats
        else:
            bad = [
                {"text@hostile": "celery"},
                {"nopool@hostile": [{"name": 5}, {"name": ["x"]}, "q", {"name": "fine"}]},
                {"notadict@hostile": [{"nameless": True}]},
            ]
            good = [{"name": "crowded"}]
        crowd_reply = {f"crowd{i}@hostile": good for i in range(crowd)}
        return [
            (pickle_trap(trap), "application/x-python-serialize"),
            (b"{not json", json_type),
            (b"[1, 2, 3]", json_type),
            (b"x" * (2 << 20), json_type),
            *((json.dumps(reply).encode(), json_type) for reply in bad),
            (json.dumps(crowd_reply).encode(), json_type),
        ]

    return replies


def test_hostile_replies_are_counted_and_dropped_and_memory_stays_bounded(
    broker, exporters, tmp_path
) -> None:
    url = broker.url
    trap = tmp_path / "unpickled"
    limit = 20
    hostile = HostileWorker(url, hostile_replies(trap, crowd=3000))
    exporter = start(exporters, url, "--inspect-interval", "0.2", "--max-label-values", str(limit))
    try:
        wait_for(lambda: rounds(exporter) >= 3 and hostile.answered >= 6, 60, "three rounds")
        assert not trap.exists(), "a pickle reply was unpickled"
        invalid = {
            reason: exporter.sample(
                "celery_exporter_inspect_replies_invalid_total", {"reason": reason}
            )
            for reason in ("too_large", "content_type", "malformed", "wrong_type", "missing_field")
        }
        assert all(count > 0 for count in invalid.values()), invalid
        assert exporter.sample("celery_exporter_inspect_errors_total", {"reason": "broker"}) == 0
        # Bad fields leave no series; the label limit caps the crowd.
        pools = series(exporter, "celery_worker_pool_size")
        hosts = {dict(labels)["hostname"] for labels in pools}
        assert {"text@hostile", "nopool@hostile", "notadict@hostile"}.isdisjoint(hosts)
        assert len(hosts) <= limit and "other" not in hosts
        assert set(pools.values()) == {4}
        assert exporter.sample("celery_exporter_label_values_folded_total", {"label": "hostname"})
        inspector = next(job for job in exporter.daemon.background if isinstance(job, Inspector))
        assert len(inspector._capacity) <= limit
        assert value(exporter, "celery_queue_workers", queue="fine") == 1
        scrape(exporter.url)
    finally:
        hostile.stop()
    # Workers never seen in events and silent now are forgotten, labels and all.
    wait_for(
        lambda: (
            not series(exporter, "celery_worker_pool_size")
            and value(exporter, "celery_queue_workers", queue="crowded") is None
        ),
        30,
        "the hostile workers forgotten",
    )
    assert exporter.daemon.tracker.label("hostname", "celery@real") == "celery@real"


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_a_broker_that_refuses_or_stalls_costs_a_round_and_is_counted(
    scheme: str, exporters
) -> None:
    refused = start(exporters, f"{scheme}://127.0.0.1:{free_port()}/", "--inspect-interval", "0.2")
    broker_errors = {"reason": "broker"}
    wait_for(
        lambda: refused.sample("celery_exporter_inspect_errors_total", broker_errors) >= 2,
        30,
        "two refused rounds",
    )
    silent = SilentServer()
    try:
        stalled = start(
            exporters,
            f"{scheme}://127.0.0.1:{silent.port}/",
            "--inspect-interval",
            "0.2",
            "--inspect-timeout",
            "0.5",
        )
        wait_for(
            lambda: stalled.sample("celery_exporter_inspect_errors_total", broker_errors) >= 2,
            30,
            "two stalled rounds",
        )
        started = time.perf_counter()
        assert "celery_exporter_inspect_errors_total" in scrape(stalled.url)
        assert time.perf_counter() - started < 0.5
        assert stalled.sample("celery_exporter_inspect_replies") == 0
    finally:
        silent.close()


def test_solo_and_autoscaling_pools_report_what_celery_reports(
    clean_redis, worker_factory, exporters
) -> None:
    url = clean_redis.url
    solo = worker_factory(url, pool="solo", queues=(unique("solo"),))
    scaled = worker_factory(url, queues=(unique("scaled"),), extra_args=("--autoscale", "5,1"))
    exporter = start(exporters, url, "--inspect-interval", "0.2")
    wait_for(
        lambda: (
            value(exporter, "celery_worker_pool_size", hostname=solo.hostname) == 1
            and value(exporter, "celery_worker_pool_size", hostname=scaled.hostname) == 5
        ),
        60,
        lambda: f"pool sizes {series(exporter, 'celery_worker_pool_size')}",
    )
    # Celery's prefetch count follows --concurrency (2 here) whatever the pool runs.
    assert value(exporter, "celery_worker_prefetch_limit", hostname=solo.hostname) == 8
    # What `celery control autoscale 3 1` sends: the maximum moves, and the series with it.
    with make_app(url) as app:
        app.control.autoscale(3, 1, destination=[scaled.hostname])
    wait_for(
        lambda: value(exporter, "celery_worker_pool_size", hostname=scaled.hostname) == 3,
        60,
        "the new maximum",
    )
