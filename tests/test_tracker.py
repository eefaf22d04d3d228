"""Task tracking: every event becomes exactly the counts and timings it implies.

The tracker is driven with hand-made events and explicit arrival times (the
daemon's clock), and read back through a Prometheus registry.
"""

from __future__ import annotations

import pytest

from exporter.track.task import exception_class
from exporter.track.tracker import HOLD_SECONDS
from tests.events import Scene, event, failed, heartbeat, received, sent, started, succeeded

W1 = {"hostname": "celery@w1"}


def test_a_full_lifecycle() -> None:
    scene = Scene()
    scene.feed(
        sent("a", "app.add", "math", 100.0),
        received("a", "app.add", 100.5),
        started("a", 101.0),
        succeeded("a", 103.0, runtime=2.0),
    )
    task = {"name": "app.add", "queue": "math"}
    assert scene.value("celery_task_sent_total", **task) == 1
    for state in ("received", "started", "succeeded"):
        assert scene.value(f"celery_task_{state}_total", **task, **W1) == 1
    assert scene.value("celery_task_runtime_seconds_sum", **task) == 2.0
    assert scene.value("celery_task_runtime_seconds_bucket", **task, le="2.5") == 1
    assert scene.value("celery_task_runtime_seconds_bucket", **task, le="1.0") == 0
    assert scene.value("celery_task_prefetch_wait_seconds_sum", **task) == 0.5
    assert scene.value("celery_task_queue_wait_seconds_sum", **task) == 1.0
    assert scene.value("celery_worker_tasks_prefetched", **W1) == 0
    assert scene.tracker.tasks == {}


def test_queue_wait_runs_from_the_eta_when_it_is_later() -> None:
    scene = Scene()
    scene.feed(
        sent("a", "app.add", "celery", 100.0, eta="1970-01-01T00:01:50+00:00"),  # 110.0
        received("a", "app.add", 100.2),
        started("a", 112.0),
    )
    assert scene.value("celery_task_queue_wait_seconds_sum", name="app.add", queue="celery") == 2.0


def test_queue_label_without_sent_events() -> None:
    scene = Scene(default_queue="default")
    scene.feed(received("a", "app.add", 1.0), succeeded("a", 2.0, 0.1))
    assert scene.value("celery_task_succeeded_total", name="app.add", queue="default", **W1) == 1
    # Once a task-sent names the queue, later tasks of that name without one get it too.
    scene.feed(
        sent("b", "app.add", "math", 3.0), received("c", "app.add", 4.0), succeeded("c", 5.0, 0.1)
    )
    scene.tracker.tick(1000.0 + HOLD_SECONDS)  # c's task-sent never comes
    assert scene.value("celery_task_succeeded_total", name="app.add", queue="math", **W1) == 1


def test_events_of_unseen_tasks_count_as_unknown() -> None:
    scene = Scene()
    scene.feed(started("x", 1.0), failed("x", 2.0, "ValueError('boom')"))
    scene.tracker.tick(1000.0 + HOLD_SECONDS - 0.1)
    assert scene.value("celery_task_started_total", name="unknown", queue="celery", **W1) is None
    scene.tracker.tick(1000.0 + HOLD_SECONDS)
    assert scene.value("celery_task_started_total", name="unknown", queue="celery", **W1) == 1
    assert (
        scene.value(
            "celery_task_failed_total", name="unknown", queue="celery", exception="ValueError", **W1
        )
        == 1
    )


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("ValueError('boom')", "ValueError"),
        ("KeyError('missing')", "KeyError"),
        ("TimeLimitExceeded(60,)", "TimeLimitExceeded"),
        (
            "billiard.exceptions.WorkerLostError('Worker exited')",
            "billiard.exceptions.WorkerLostError",
        ),
        ("", "unknown"),
        (None, "unknown"),
        ("<weird object at 0x7f>", "unknown"),
    ],
)
def test_exception_class(text: str | None, name: str) -> None:
    assert exception_class(text) == name


def test_retries_keep_the_task_and_count_the_cause() -> None:
    scene = Scene()
    scene.feed(
        sent("a", "app.fetch", "io", 1.0),
        received("a", "app.fetch", 1.1),
        started("a", 1.2),
        event("task-retried", 1.3, uuid="a", exception="ConnectionError('down')"),
        sent("a", "app.fetch", "io", 1.4),
        received("a", "app.fetch", 1.5),
        started("a", 1.6),
        succeeded("a", 1.7, 0.1),
    )
    task = {"name": "app.fetch", "queue": "io"}
    assert scene.value("celery_task_retried_total", exception="ConnectionError", **task, **W1) == 1
    assert scene.value("celery_task_sent_total", **task) == 2
    assert scene.value("celery_task_received_total", **task, **W1) == 2
    assert scene.value("celery_task_succeeded_total", **task, **W1) == 1


def test_revoked_and_rejected() -> None:
    scene = Scene()
    scene.feed(
        sent("a", "app.add", "celery", 1.0),
        received("a", "app.add", 1.1),
        event("task-revoked", 1.2, uuid="a", terminated=False, expired=True),
    )
    assert scene.value("celery_task_revoked_total", name="app.add", queue="celery", **W1) == 1
    assert scene.value("celery_worker_tasks_prefetched", **W1) == 0
    # A Reject sends task-failed, then task-rejected: both keep the task's name.
    scene.feed(
        received("b", "app.check", 2.0),
        started("b", 2.1),
        failed("b", 2.2, "Reject('bad')"),
        event("task-rejected", 2.3, uuid="b", requeue=False),
    )
    scene.tracker.tick(1000.0 + HOLD_SECONDS)
    assert scene.value("celery_task_rejected_total", name="app.check", queue="celery", **W1) == 1


def test_events_that_overtake_task_sent_wait_for_it() -> None:
    scene = Scene()
    scene.feed(sent("a", "app.add", "celery", 1.0))
    # Published by other processes, these arrive before the task-sent of "b" and "c".
    scene.feed(
        event("task-revoked", 2.1, uuid="b", expired=True),
        received("c", "app.report", 2.2),
        started("c", 2.3),
        succeeded("c", 2.4, 0.1),
    )
    assert (
        scene.value("celery_task_succeeded_total", name="app.report", queue="reports", **W1) is None
    )
    scene.feed(sent("b", "app.add", "celery", 2.0), sent("c", "app.report", "reports", 2.0))
    assert scene.value("celery_task_revoked_total", name="app.add", queue="celery", **W1) == 1
    assert scene.value("celery_task_succeeded_total", name="app.report", queue="reports", **W1) == 1
    assert (
        scene.value("celery_task_queue_wait_seconds_count", name="app.report", queue="reports") == 1
    )
    # Late events of a finished task count under its name and track nothing.
    scene.feed(
        event("task-retried", 2.5, uuid="c", exception="OSError()"),
        sent("c", "app.report", "reports", 2.45),
    )
    assert (
        scene.value(
            "celery_task_retried_total",
            name="app.report",
            queue="reports",
            exception="OSError",
            **W1,
        )
        == 1
    )
    scene.tracker.tick(1000.0 + HOLD_SECONDS)
    assert list(scene.tracker.tasks) == ["a"]
    assert scene.value("celery_worker_tasks_prefetched", **W1) == 0


def test_prefetched_counts_received_but_not_started() -> None:
    scene = Scene()
    scene.feed(
        *(received(f"t{i}", "app.add", 1.0) for i in range(5)),
        started("t0", 2.0),
        started("t1", 2.0),
    )
    assert scene.value("celery_worker_tasks_prefetched", **W1) == 3
    scene.feed(succeeded("t0", 3.0, 1.0), event("task-revoked", 3.0, uuid="t2"))
    assert scene.value("celery_worker_tasks_prefetched", **W1) == 2


def test_the_table_is_bounded_and_evictions_are_counted() -> None:
    scene = Scene(max_tracked_tasks=3)
    scene.feed(*(received(f"t{i}", "app.add", 1.0) for i in range(5)))
    scene.tracker.tick(1.0)
    assert list(scene.tracker.tasks) == ["t2", "t3", "t4"]
    assert scene.value("celery_exporter_tracked_tasks") == 3
    assert scene.value("celery_exporter_tracked_tasks_evicted_total") == 2
    assert scene.value("celery_worker_tasks_prefetched", **W1) == 3


def test_event_types_and_lag() -> None:
    scene = Scene()
    scene.feed(
        heartbeat("celery@w1", 999.0),
        {"type": "app-progress", "timestamp": 998.0, "hostname": "celery@w1"},
        arrival=1000.0,
    )
    assert scene.value("celery_exporter_events_total", type="worker-heartbeat") == 1
    assert scene.value("celery_exporter_events_total", type="other") == 1
    assert scene.value("celery_exporter_event_lag_seconds_count") == 2
    assert scene.value("celery_exporter_event_lag_seconds_sum") == 3.0


def test_label_values_fold_past_the_cap() -> None:
    scene = Scene(max_label_values=2)
    for i in range(4):
        scene.feed(received(f"t{i}", f"app.task{i}", 1.0), succeeded(f"t{i}", 2.0, 0.1))
    assert scene.value("celery_task_succeeded_total", name="app.task1", queue="celery", **W1) == 1
    assert scene.value("celery_task_succeeded_total", name="other", queue="celery", **W1) == 2
    assert scene.value("celery_exporter_label_values_folded_total", label="name") == 2
