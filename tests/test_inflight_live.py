"""Work in flight on real brokers with real prefork workers: what runs, what a killed
worker interrupted, how long failures took, and the events the exporter missed."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from tests.celery_app import make_app
from tests.harness import WORKER_TIMEOUT, ExporterProcess, InProcessExporter, wait_up
from tests.servers import RabbitMQServer, wait_for

SLEEP = {"name": "tests.sleep", "queue": "celery"}


def _after_two_heartbeats(exporter: InProcessExporter | ExporterProcess, hostname: str) -> None:
    """Every heartbeat judges the one before it: two more settle the missed count."""
    labels = {"hostname": hostname}
    first = exporter.sample("celery_worker_last_heartbeat_timestamp_seconds", labels)
    wait_for(
        lambda: (
            exporter.sample("celery_worker_last_heartbeat_timestamp_seconds", labels) > first + 3
        ),
        timeout=20,
        message=f"no further heartbeats from {hostname}",
    )


def test_running_tasks_then_a_killed_worker_counts_them_interrupted(
    broker: Any, exporter: InProcessExporter, worker_factory: Callable[..., Any]
) -> None:
    worker = worker_factory(broker.url, concurrency=2, extra_args=["--prefetch-multiplier", "1"])
    wait_up(exporter, worker.hostname)
    app = make_app(broker.url)
    before = time.time()
    for _ in range(2):
        app.send_task("tests.sleep", (120,))
    on_worker = {"hostname": worker.hostname, **SLEEP}
    wait_for(
        lambda: exporter.sample("celery_task_running", SLEEP) == 2,
        timeout=30,
        message=lambda: f"running: {exporter.sample('celery_task_running', SLEEP)}, want 2",
    )
    oldest = exporter.sample("celery_task_oldest_running_start_timestamp_seconds", SLEEP)
    assert before - 3 <= oldest <= time.time() + 3
    # One more waits in the worker's prefetch: not running, so not interrupted.
    app.send_task("tests.sleep", (120,))
    wait_for(
        lambda: (
            exporter.sample("celery_worker_tasks_prefetched", {"hostname": worker.hostname}) == 1
        ),
        timeout=30,
        message="the third task was never prefetched",
    )
    assert exporter.sample("celery_exporter_events_missed_total") == 0

    worker.kill()
    wait_for(
        lambda: exporter.sample("celery_task_interrupted_total", on_worker) == 2,
        timeout=WORKER_TIMEOUT + 20,
        message=lambda: (
            f"interrupted: {exporter.sample('celery_task_interrupted_total', on_worker)}, want 2"
        ),
    )
    assert exporter.sample("celery_worker_up", {"hostname": worker.hostname}) == 0
    wait_for(
        lambda: exporter.sample("celery_task_running", SLEEP) == 0,
        timeout=5,
        message="the interrupted tasks still count as running",
    )
    assert exporter.sample("celery_task_oldest_running_start_timestamp_seconds", SLEEP) == 0
    assert exporter.sample("celery_worker_tasks_prefetched", {"hostname": worker.hostname}) == 0
    assert exporter.total("celery_task_interrupted_total") == 2
    assert exporter.sample("celery_exporter_events_missed_total") == 0


def test_rejects_and_failure_run_times(
    broker: Any, exporter: InProcessExporter, worker_factory: Callable[..., Any]
) -> None:
    worker = worker_factory(broker.url, concurrency=2)
    wait_up(exporter, worker.hostname)
    app = make_app(broker.url)
    app.send_task("tests.reject")
    for _ in range(2):
        app.send_task("tests.sleep_then_fail", (1.5,))
    for i in range(3):
        app.send_task("tests.add", (i, i))
    on = {"hostname": worker.hostname, "queue": "celery"}
    failing = {"name": "tests.sleep_then_fail", "queue": "celery"}
    wait_for(
        lambda: (
            exporter.sample(
                "celery_task_failed_total", {**on, "name": "tests.reject", "exception": "Reject"}
            )
            == 1
            and exporter.sample("celery_task_rejected_total", {**on, "name": "tests.reject"}) == 1
            and exporter.sample("celery_task_failed_runtime_seconds_count", failing) == 2
            and exporter.sample("celery_task_succeeded_total", {**on, "name": "tests.add"}) == 3
        ),
        timeout=60,
        message=lambda: f"failures not counted as expected: {_failures(exporter)}",
    )
    assert exporter.total("celery_task_failed_total", exception="unknown") == 0
    total = exporter.sample("celery_task_failed_runtime_seconds_sum", failing)
    assert 2 * 1.5 <= total < 2 * 1.5 + 2.0, total
    # Each hung 1.5 s before failing: both in the bucket up to 2.5 s, none under 1 s.
    assert (
        exporter.sample("celery_task_failed_runtime_seconds_bucket", {**failing, "le": "1.0"}) == 0
    )
    assert (
        exporter.sample("celery_task_failed_runtime_seconds_bucket", {**failing, "le": "2.5"}) == 2
    )
    # The succeeded run time holds succeeded tasks only.
    assert exporter.sample("celery_task_runtime_seconds_count", failing) == 0
    wait_for(
        lambda: exporter.sample("celery_task_running", failing) == 0,
        timeout=5,
        message="failed tasks still count as running",
    )
    _after_two_heartbeats(exporter, worker.hostname)
    assert exporter.sample("celery_exporter_events_missed_total") == 0


def _failures(exporter: InProcessExporter) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, sample.labels, sample.value)
        for family in exporter.daemon.registry.collect()
        for sample in family.samples
        if sample.name.startswith("celery_task_failed")
    ]


def test_process_metrics_are_served(exporter: InProcessExporter) -> None:
    assert exporter.sample("process_resident_memory_bytes") > 1_000_000
    assert exporter.sample("process_open_fds") > 0
    assert exporter.sample("process_cpu_seconds_total") > 0
    assert exporter.total("python_info") == 1


def test_events_lost_while_the_exporter_is_paused_are_counted_as_missed(
    clean_rabbitmq: RabbitMQServer, worker_factory: Callable[..., Any]
) -> None:
    """SIGSTOP the exporter while a worker runs thousands of tasks: past the socket
    buffers, RabbitMQ expires the events after the queue's TTL, and the heartbeats'
    processed counts tell how many task-started events never arrived."""
    broker_url = clean_rabbitmq.url
    exporter = ExporterProcess(
        ["--broker-url", broker_url, "--event-queue-ttl", "1", "--worker-timeout", "300"]
    )
    try:
        exporter.wait_serving()
        worker = worker_factory(broker_url, concurrency=4)
        wait_up(exporter, worker.hostname)
        tasks = 6000
        padding = "x" * 400  # fills the socket buffers sooner: ~3 KB of events a task
        os.kill(exporter.process.pid, signal.SIGSTOP)
        try:
            app = make_app(broker_url)
            with app.producer_or_acquire() as producer:
                for _ in range(tasks):
                    app.send_task("tests.add", (padding, padding), producer=producer)
            wait_for(
                lambda: worker.log_text().count("succeeded in") >= tasks,
                timeout=240,
                interval=0.5,
                message=lambda: f"worker finished {worker.log_text().count('succeeded in')}",
            )
        finally:
            os.kill(exporter.process.pid, signal.SIGCONT)
        # Once a heartbeat counting every task arrives, the events before it have been
        # read (one connection from the worker); two more judge the last interval.
        host = {"hostname": worker.hostname}
        wait_for(
            lambda: exporter.sample("celery_worker_tasks_processed_total", host) == tasks,
            timeout=120,
            message="no heartbeat counted every task",
        )
        _after_two_heartbeats(exporter, worker.hostname)
        # A task whose task-received was lost counts its start under the name "unknown".
        seen = sum(
            value
            for (name, labels), value in exporter.samples().items()
            if name == "celery_task_started_total" and ("hostname", worker.hostname) in labels
        )
        lost = tasks - seen
        missed = exporter.sample("celery_exporter_events_missed_total")
        assert lost >= 200, f"only {lost} task-started events were lost: no loss was forced"
        assert abs(missed - lost) <= 0.05 * lost, (missed, lost)
    finally:
        exporter.stop()
