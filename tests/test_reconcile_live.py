"""In-flight figures that stay true on real brokers with real prefork workers: across an
exporter restart, a paused worker, a killed one, a lost final event and ETA tasks, with
the workers' own inspect replies as the truth."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import redis

from exporter.track.reconcile import REASONS
from tests import test_queues
from tests.celery_app import make_app
from tests.harness import ExporterProcess, InProcessExporter, wait_up
from tests.servers import RedisServer, wait_for

TIMEOUT = 5
"""--worker-timeout, as a user with a short one would set it."""
OPTIONS = ["--worker-timeout", str(TIMEOUT), "--inspect-interval", "5"]
SLEEP = {"name": "tests.sleep", "queue": "celery"}


exporters = test_queues.exporters  # the fixture: exporters a test starts, stopped after it


def start(exporters: list[InProcessExporter], url: str) -> InProcessExporter:
    exporter = InProcessExporter(["--broker-url", url, *OPTIONS])
    exporters.append(exporter)
    wait_for(
        lambda: exporter.sample("celery_exporter_broker_connected") == 1,
        timeout=20,
        message="exporter never connected",
    )
    return exporter


def running(
    exporters: list[InProcessExporter], url: str, worker: Any, count: int, seconds: float
) -> InProcessExporter:
    """An exporter watching ``worker`` run ``count`` sleeps of ``seconds``."""
    exporter = start(exporters, url)
    wait_up(exporter, worker.hostname)
    app = make_app(url)
    for _ in range(count):
        app.send_task("tests.sleep", (seconds,))
    wait_for(
        lambda: exporter.sample("celery_task_running", SLEEP) == count,
        timeout=30,
        message="the tasks never ran",
    )
    return exporter


def reconciled(exporter: InProcessExporter | ExporterProcess) -> dict[str, float]:
    return {
        reason: exporter.sample("celery_exporter_tasks_reconciled_total", {"reason": reason})
        for reason in REASONS
    }


def after_rounds(exporter: InProcessExporter, count: int) -> None:
    """Wait for ``count`` more inspect rounds, and for them to be judged."""
    name = "celery_exporter_inspect_duration_seconds_count"
    target = exporter.sample(name) + count
    wait_for(lambda: exporter.sample(name) >= target, timeout=20 * count, message="no rounds")
    deadline = time.time() + 5
    wait_for(
        lambda: time.time() > deadline or not exporter.daemon.tracker.reconciliations,
        timeout=10,
        message="rounds not judged",
    )


def test_after_a_restart_running_and_prefetched_tasks_are_known_at_once(
    broker: Any, exporters: list[InProcessExporter], worker_factory: Callable[..., Any]
) -> None:
    first = start(exporters, broker.url)
    worker = worker_factory(broker.url, concurrency=2, extra_args=["--prefetch-multiplier", "1"])
    host = {"hostname": worker.hostname}
    wait_up(first, worker.hostname)
    app = make_app(broker.url)
    for _ in range(4):  # two run, two wait in the worker's prefetch buffer
        app.send_task("tests.sleep", (12,))
    wait_for(
        lambda: (
            first.sample("celery_task_running", SLEEP) == 2
            and first.sample("celery_worker_tasks_prefetched", host) == 2
        ),
        timeout=30,
        message="the worker never ran two and held two",
    )
    real_start = first.sample("celery_task_oldest_running_start_timestamp_seconds", SLEEP)
    first.stop()
    exporters.remove(first)

    restarted = time.time()
    second = start(exporters, broker.url)
    wait_for(
        lambda: (
            second.sample("celery_task_running", SLEEP) == 2
            and second.sample("celery_worker_tasks_prefetched", host) == 2
        ),
        timeout=10 - (time.time() - restarted),
        message=lambda: (
            f"running {second.sample('celery_task_running', SLEEP)}, prefetched "
            f"{second.sample('celery_worker_tasks_prefetched', host)}, want 2 and 2"
        ),
    )
    oldest = second.sample("celery_task_oldest_running_start_timestamp_seconds", SLEEP)
    assert abs(oldest - real_start) <= 3, (oldest, real_start)
    wait_for(
        lambda: second.sample("celery_task_succeeded_total", {**SLEEP, **host}) == 4,
        timeout=60,
        message=lambda: f"succeeded: {second.total('celery_task_succeeded_total')}, want 4",
    )
    assert second.total("celery_task_succeeded_total", name="unknown") == 0
    assert reconciled(second)["running_unseen"] == 2
    assert reconciled(second)["waiting_unseen"] == 2
    wait_for(
        lambda: second.sample("celery_task_running", SLEEP) == 0,
        timeout=5,
        message="finished tasks still count as running",
    )


def test_a_paused_worker_interrupts_nothing(
    broker: Any, exporters: list[InProcessExporter], worker_factory: Callable[..., Any]
) -> None:
    worker = worker_factory(broker.url, concurrency=2)
    host = {"hostname": worker.hostname}
    exporter = running(exporters, broker.url, worker, 2, 12)
    os.killpg(worker.pgid, signal.SIGSTOP)  # a frozen VM: the worker and its pool
    paused = time.monotonic()
    try:
        wait_for(
            lambda: exporter.sample("celery_worker_up", host) == 0,
            timeout=TIMEOUT + 5,
            message="the paused worker was never down",
        )
        time.sleep(max(0.0, 8 - (time.monotonic() - paused)))  # the pause itself: 8 s
    finally:
        os.killpg(worker.pgid, signal.SIGCONT)
    wait_up(exporter, worker.hostname)
    wait_for(
        lambda: exporter.sample("celery_task_succeeded_total", {**SLEEP, **host}) == 2,
        timeout=30,
        message="the tasks never succeeded",
    )
    assert exporter.total("celery_task_interrupted_total") == 0
    wait_for(
        lambda: exporter.sample("celery_task_running", SLEEP) == 0,
        timeout=5,
        message="the tasks still count as running",
    )


def test_a_killed_workers_tasks_are_interrupted_exactly_within_30_seconds(
    broker: Any, exporters: list[InProcessExporter], worker_factory: Callable[..., Any]
) -> None:
    worker = worker_factory(broker.url, concurrency=3)
    exporter = running(exporters, broker.url, worker, 3, 120)
    worker.kill()
    killed = time.monotonic()
    on_worker = {"hostname": worker.hostname, **SLEEP}
    wait_for(
        lambda: exporter.sample("celery_task_interrupted_total", on_worker) == 3,
        timeout=30,
        message=lambda: (
            f"interrupted: {exporter.sample('celery_task_interrupted_total', on_worker)}"
        ),
    )
    assert time.monotonic() - killed < 30
    wait_for(
        lambda: exporter.sample("celery_task_running", SLEEP) == 0,
        timeout=5,
        message="the tasks still count as running",
    )
    assert exporter.total("celery_task_interrupted_total") == 3
    assert reconciled(exporter)["finished_unseen"] == 0


def test_a_lost_final_event_leaves_the_running_figures_counted_once(
    clean_redis: RedisServer, worker_factory: Callable[..., Any]
) -> None:
    """The exporter paused while a task finishes, and Redis cutting its subscription:
    the task-succeeded is never seen, the worker's reply says the task is done."""
    exporter = ExporterProcess(["--broker-url", clean_redis.url, *OPTIONS])
    try:
        exporter.wait_serving()
        worker = worker_factory(clean_redis.url, concurrency=2)
        wait_up(exporter, worker.hostname)
        app = make_app(clean_redis.url)
        app.send_task("tests.sleep", (3,))
        wait_for(
            lambda: exporter.sample("celery_task_running", SLEEP) == 1,
            timeout=30,
            message="the task never ran",
        )
        os.kill(exporter.process.pid, signal.SIGSTOP)
        try:
            client = redis.Redis.from_url(clean_redis.url)
            assert client.client_kill_filter(_type="pubsub") >= 1
            wait_for(
                lambda: "succeeded in" in worker.log_text(),
                timeout=30,
                message="the task never finished",
            )
        finally:
            os.kill(exporter.process.pid, signal.SIGCONT)
        resumed = time.monotonic()
        wait_for(
            lambda: exporter.sample("celery_task_running", SLEEP) == 0,
            timeout=15,
            message="the finished task still counts as running",
        )
        assert time.monotonic() - resumed < 15
        assert exporter.sample("celery_task_succeeded_total", {**SLEEP}) == 0  # never seen
        counted = reconciled(exporter)
        assert counted["finished_unseen"] == 1, counted
        rounds = exporter.sample("celery_exporter_inspect_duration_seconds_count")
        wait_for(
            lambda: exporter.sample("celery_exporter_inspect_duration_seconds_count") >= rounds + 2,
            timeout=30,
            message="no further rounds",
        )
        assert reconciled(exporter) == counted  # once
        assert exporter.sample("celery_task_interrupted_total", {**SLEEP}) == 0
    finally:
        exporter.stop()


def test_countdown_tasks_and_retries_are_scheduled_not_prefetched(
    broker: Any, exporters: list[InProcessExporter], worker_factory: Callable[..., Any]
) -> None:
    exporter = start(exporters, broker.url)
    worker = worker_factory(broker.url, concurrency=2)
    host = {"hostname": worker.hostname}
    wait_up(exporter, worker.hostname)
    app = make_app(broker.url)
    app.send_task("tests.add", (1, 2), countdown=6)
    app.send_task("tests.retry_later", (6,))
    wait_for(
        lambda: exporter.sample("celery_worker_tasks_scheduled", host) == 2,
        timeout=20,
        message=lambda: f"scheduled: {exporter.sample('celery_worker_tasks_scheduled', host)}",
    )
    assert exporter.sample("celery_worker_tasks_prefetched", host) == 0
    for name in ("tests.add", "tests.retry_later"):
        on = {"name": name, "queue": "celery", **host}
        wait_for(
            lambda on=on: exporter.sample("celery_task_succeeded_total", on) == 1,
            timeout=30,
            message=f"{name} never succeeded",
        )
    wait_for(
        lambda: exporter.sample("celery_worker_tasks_scheduled", host) == 0,
        timeout=10,
        message="tasks past their ETA still count as scheduled",
    )
    assert exporter.sample("celery_worker_tasks_prefetched", host) == 0
    for name, waits in (("tests.add", 1), ("tests.retry_later", 2)):
        labels = {"name": name, "queue": "celery"}
        assert exporter.sample("celery_task_prefetch_wait_seconds_count", labels) == waits
        assert exporter.sample("celery_task_prefetch_wait_seconds_sum", labels) < waits * 1.0
    retried = {"name": "tests.retry_later", "queue": "celery", "exception": "RuntimeError"}
    assert exporter.sample("celery_task_retried_total", {**retried, **host}) == 1


def test_a_clean_run_counts_every_task_once_and_reconciles_nothing(
    broker: Any, exporters: list[InProcessExporter], worker_factory: Callable[..., Any]
) -> None:
    exporter = start(exporters, broker.url)
    worker = worker_factory(broker.url, concurrency=2, extra_args=["--prefetch-multiplier", "2"])
    host = {"hostname": worker.hostname, "queue": "celery"}
    wait_up(exporter, worker.hostname)
    app = make_app(broker.url)
    for _ in range(4):
        app.send_task("tests.sleep", (4,))
    for i in range(40):
        app.send_task("tests.add", (i, i))
    app.send_task("tests.fail", ("boom",))
    app.send_task("tests.add", (0, 0), countdown=3)
    after_rounds(exporter, 1)  # rounds while tasks run and wait
    wait_for(
        lambda: (
            exporter.sample("celery_task_succeeded_total", {"name": "tests.add", **host}) == 41
            and exporter.sample("celery_task_succeeded_total", {"name": "tests.sleep", **host}) == 4
        ),
        timeout=60,
        message="tasks never finished",
    )
    after_rounds(exporter, 2)
    assert reconciled(exporter) == dict.fromkeys(REASONS, 0)
    assert exporter.total("celery_task_started_total") == 46
    assert exporter.total("celery_task_failed_total") == 1
    assert exporter.total("celery_task_interrupted_total") == 0
    assert exporter.sample("celery_task_running", SLEEP) == 0
    assert exporter.sample("celery_worker_tasks_prefetched", {"hostname": worker.hostname}) == 0
