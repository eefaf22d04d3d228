"""Real Celery workers on real brokers: the exported values are what really happened."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import chain

from tests.celery_app import make_app
from tests.harness import WORKER_TIMEOUT, InProcessExporter, wait_up
from tests.servers import wait_for


def test_a_mix_of_outcomes_is_counted_exactly(
    broker: Any, exporter: InProcessExporter, worker_factory: Callable[..., Any]
) -> None:
    worker = worker_factory(broker.url, queues=("celery", "reports"))
    wait_up(exporter, worker.hostname)
    app = make_app(broker.url)
    for i in range(5):
        app.send_task("tests.add", (i, i))
    for _ in range(3):
        app.send_task("tests.fail", ("boom",))
    for _ in range(2):
        app.send_task("tests.fail_key")
    app.send_task("tests.retry_then_succeed", (2,))
    for _ in range(2):
        # Due in 2 s, expired after 1: the worker holds it, then revokes it as expired.
        # (An expiry already past would let RabbitMQ drop the message unseen.)
        app.send_task("tests.add", (1, 1), countdown=2, expires=1)
    app.send_task("tests.noop", queue="reports")
    chain(app.signature("tests.add", (1, 2)), app.signature("tests.add", (3,))).apply_async()

    on = {"hostname": worker.hostname, "queue": "celery"}
    add = {"name": "tests.add", **on}
    retry = {**on, "name": "tests.retry_then_succeed"}
    expected = {
        ("celery_task_sent_total", (("name", "tests.add"), ("queue", "celery"))): 5 + 2 + 2,
        ("celery_task_received_total", _key(add)): 7 + 2,
        ("celery_task_started_total", _key(add)): 7,
        ("celery_task_succeeded_total", _key(add)): 7,
        ("celery_task_revoked_total", _key(add)): 2,
        ("celery_task_runtime_seconds_count", (("name", "tests.add"), ("queue", "celery"))): 7,
        ("celery_task_queue_wait_seconds_count", (("name", "tests.add"), ("queue", "celery"))): 7,
        (
            "celery_task_failed_total",
            _key({**on, "name": "tests.fail", "exception": "ValueError"}),
        ): 3,
        (
            "celery_task_failed_total",
            _key({**on, "name": "tests.fail_key", "exception": "KeyError"}),
        ): 2,
        ("celery_task_retried_total", _key({**retry, "exception": "RuntimeError"})): 2,
        ("celery_task_sent_total", (("name", "tests.retry_then_succeed"), ("queue", "celery"))): 3,
        ("celery_task_received_total", _key(retry)): 3,
        ("celery_task_succeeded_total", _key(retry)): 1,
        ("celery_task_succeeded_total", _key({**on, "name": "tests.noop", "queue": "reports"})): 1,
        ("celery_exporter_tracked_tasks", ()): 0,
    }
    # Pool processes buffer their events, so each count settles on its own time.
    wait_for(
        lambda: not _mismatches(exporter, expected),
        timeout=60,
        message=lambda: (
            "exported values differ from what happened, as (got, expected): "
            f"{_mismatches(exporter, expected)}"
        ),
    )
    assert exporter.total("celery_task_failed_total", name="unknown") == 0
    assert exporter.total("celery_exporter_events_invalid_total") == 0


def _key(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(labels.items())


def _mismatches(
    exporter: InProcessExporter, expected: dict[tuple[str, tuple], float]
) -> dict[str, tuple[float, float]]:
    found = {}
    for (metric, labels), value in expected.items():
        got = exporter.sample(metric, dict(labels))
        if got != value:
            found[f"{metric}{dict(labels)}"] = (got, value)
    return found


def test_a_killed_worker_goes_down_within_the_timeout(
    broker: Any, exporter: InProcessExporter, worker_factory: Callable[..., Any]
) -> None:
    worker = worker_factory(broker.url)
    wait_up(exporter, worker.hostname)
    worker.kill()
    wait_for(
        lambda: exporter.sample("celery_worker_up", {"hostname": worker.hostname}) == 0,
        timeout=WORKER_TIMEOUT + 3,
        message="the killed worker still reads as up",
    )
