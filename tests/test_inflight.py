"""Work in flight from the task table: running, oldest, interrupted, failed run times,
exception classes and events missed, each with a controllable clock."""

from __future__ import annotations

import logging

import pytest

from exporter.track.missed import MAX_STARTS_PER_SECOND
from exporter.track.task import exception_class
from tests.events import Scene, event, failed, heartbeat, received, started, succeeded

ADD = {"name": "app.add", "queue": "celery"}
W1 = {"hostname": "celery@w1"}
REJECT_TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "celery/app/trace.py", line 453, in trace_task\n'
    "    R = retval = fun(*args, **kwargs)\n"
    "celery.exceptions.Reject: (ValueError('unprocessable payload'), False)\n"
)


def run(scene: Scene, uuid: str, at: float, hostname: str = "celery@w1") -> None:
    scene.feed(received(uuid, "app.add", at, hostname), started(uuid, at, hostname), arrival=at)


def test_running_tasks_and_the_oldest_start_follow_the_table_at_the_tick() -> None:
    scene = Scene()
    run(scene, "a", 100.0)
    run(scene, "b", 105.0)
    scene.tracker.tick(106.0)
    assert scene.value("celery_task_running", **ADD) == 2
    assert scene.value("celery_task_oldest_running_start_timestamp_seconds", **ADD) == 100.0
    scene.feed(succeeded("a", 110.0, 10.0), arrival=110.0)
    scene.tracker.tick(111.0)
    assert scene.value("celery_task_running", **ADD) == 1
    assert scene.value("celery_task_oldest_running_start_timestamp_seconds", **ADD) == 105.0
    scene.feed(failed("b", 112.0, "ValueError('x')"), arrival=112.0)
    scene.tracker.tick(113.0)
    assert scene.value("celery_task_running", **ADD) == 0
    assert scene.value("celery_task_oldest_running_start_timestamp_seconds", **ADD) is None


def test_a_retry_ends_the_execution_and_the_next_start_begins_another() -> None:
    scene = Scene()
    run(scene, "a", 100.0)
    scene.feed(event("task-retried", 101.0, uuid="a", exception="IOError()"), arrival=101.0)
    scene.tracker.tick(102.0)
    assert scene.value("celery_task_running", **ADD) == 0
    run(scene, "a", 130.0)
    scene.tracker.tick(131.0)
    assert scene.value("celery_task_running", **ADD) == 1
    assert scene.value("celery_task_oldest_running_start_timestamp_seconds", **ADD) == 130.0


def test_an_evicted_task_leaves_the_running_figure() -> None:
    scene = Scene(max_tracked_tasks=2)
    for index, uuid in enumerate("abc"):
        run(scene, uuid, 100.0 + index)
    scene.tracker.tick(104.0)
    assert scene.value("celery_task_running", **ADD) == 2
    assert scene.value("celery_task_oldest_running_start_timestamp_seconds", **ADD) == 101.0


def test_failed_run_time_is_measured_from_task_started_and_succeeded_keeps_its_meaning() -> None:
    scene = Scene()
    run(scene, "a", 100.0)
    scene.feed(failed("a", 102.5, "ValueError('x')"), arrival=103.0)
    run(scene, "b", 200.0)
    scene.feed(succeeded("b", 209.0, 7.0), arrival=209.0)
    assert scene.value("celery_task_failed_runtime_seconds_count", **ADD) == 1
    assert scene.value("celery_task_failed_runtime_seconds_sum", **ADD) == 2.5
    assert scene.value("celery_task_runtime_seconds_sum", **ADD) == 7.0
    assert scene.value("celery_task_runtime_seconds_count", **ADD) == 1


def test_a_failure_before_any_start_has_no_run_time() -> None:
    scene = Scene()
    scene.feed(received("a", "app.add", 100.0), failed("a", 101.0, "KeyError()"), arrival=101.0)
    assert scene.value("celery_task_failed_runtime_seconds_count", **ADD) is None
    assert scene.value("celery_task_failed_total", exception="KeyError", **ADD, **W1) == 1


@pytest.mark.parametrize(
    ("text", "traceback", "expected"),
    [
        ("ValueError('boom')", None, "ValueError"),
        ("reject requeue=False: unprocessable payload", REJECT_TRACEBACK, "Reject"),
        ("reject requeue=False: unprocessable payload", None, "unknown"),
        ("", "Traceback (most recent call last):\nKeyError: 'x'\n", "KeyError"),
        ("a message", "no class here at all", "unknown"),
        (None, 'Traceback ...\n  File "x.py", line 1\n', "unknown"),
        ("pkg.errors.Oops('x')", None, "pkg.errors.Oops"),
    ],
)
def test_exception_class_falls_back_to_the_tracebacks_last_line(
    text: str | None, traceback: str | None, expected: str
) -> None:
    assert exception_class(text, traceback) == expected


def test_a_reject_is_labelled_reject() -> None:
    scene = Scene()
    run(scene, "a", 100.0)
    scene.feed(
        failed("a", 101.0, "reject requeue=False: unprocessable payload",
               traceback=REJECT_TRACEBACK),
        event("task-rejected", 101.0, uuid="a", requeue=False),
        arrival=101.0,
    )  # fmt: skip
    assert scene.value("celery_task_failed_total", exception="Reject", **ADD, **W1) == 1
    assert scene.value("celery_task_rejected_total", **ADD, **W1) == 1


def test_a_lost_worker_interrupts_its_running_tasks_and_frees_its_prefetched(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scene = Scene(worker_timeout=30.0)
    scene.feed(heartbeat("celery@w1", 100.0), heartbeat("celery@w2", 100.0), arrival=100.0)
    run(scene, "a", 100.0)
    run(scene, "b", 101.0)
    run(scene, "c", 101.0, hostname="celery@w2")
    scene.feed(received("d", "app.add", 102.0), arrival=102.0)  # prefetched only
    scene.feed(heartbeat("celery@w2", 125.0), arrival=125.0)
    scene.tracker.tick(125.0)
    assert scene.value("celery_task_running", **ADD) == 3
    assert scene.value("celery_worker_tasks_prefetched", **W1) == 1
    scene.tracker.tick(131.0)
    # Down, but maybe only paused: nothing is interrupted for another worker_timeout.
    assert scene.value("celery_worker_up", **W1) == 0
    assert scene.value("celery_task_interrupted_total", **ADD, **W1) is None
    assert scene.value("celery_task_running", **ADD) == 3
    assert scene.value("celery_worker_tasks_prefetched", **W1) == 1
    scene.feed(heartbeat("celery@w2", 150.0), arrival=150.0)
    scene.tracker.tick(160.0)
    assert scene.value("celery_task_interrupted_total", **ADD, **W1) is None
    with caplog.at_level(logging.WARNING, logger="exporter.track.tracker"):
        scene.tracker.tick(161.0)
    assert scene.value("celery_worker_up", **W1) == 0
    assert scene.value("celery_task_interrupted_total", **ADD, **W1) == 2
    assert scene.value("celery_task_interrupted_total", hostname="celery@w2", **ADD) is None
    assert scene.value("celery_task_running", **ADD) == 1  # c, on the live worker
    assert scene.value("celery_worker_tasks_prefetched", **W1) == 0
    [line] = [r.getMessage() for r in caplog.records if "lost" in r.getMessage()]
    assert "celery@w1" in line and "2 tasks" in line and "a, b" in line
    # A later tick counts nothing again; a redelivery elsewhere is applied normally.
    scene.feed(heartbeat("celery@w2", 170.0), arrival=170.0)
    scene.tracker.tick(170.0)
    run(scene, "a", 171.0, hostname="celery@w2")
    scene.feed(succeeded("a", 172.0, 1.0, hostname="celery@w2"), arrival=172.0)
    scene.tracker.tick(173.0)
    assert scene.value("celery_task_interrupted_total", **ADD, **W1) == 2
    assert scene.value("celery_task_succeeded_total", hostname="celery@w2", **ADD) == 1
    assert scene.value("celery_task_running", **ADD) == 1


def test_a_worker_that_says_goodbye_interrupts_nothing_and_its_tasks_leave_the_figures() -> None:
    scene = Scene(worker_timeout=30.0)
    scene.feed(heartbeat("celery@w1", 100.0), arrival=100.0)
    run(scene, "a", 100.0)
    run(scene, "b", 100.0)
    scene.feed(event("worker-offline", 101.0), arrival=101.0)
    # The events of its last tasks may trail the goodbye.
    scene.feed(succeeded("a", 101.0, 1.0), arrival=102.0)
    scene.tracker.tick(132.0)
    assert scene.value("celery_task_interrupted_total", **ADD, **W1) is None
    assert scene.value("celery_task_running", **ADD) == 0
    assert scene.value("celery_task_succeeded_total", **ADD, **W1) is None


def test_a_silent_worker_stays_down_a_day_by_default() -> None:
    scene = Scene(purge_offline_after=86400.0)
    scene.feed(heartbeat("celery@w1", 100.0), arrival=100.0)
    scene.tracker.tick(100.0 + 86000.0)
    assert scene.value("celery_worker_up", **W1) == 0
    scene.tracker.tick(100.0 + 86401.0)
    assert scene.value("celery_worker_up", **W1) is None


# Events missed, from the heartbeats' processed counts.


def beat(scene: Scene, at: float, processed: int, hostname: str = "celery@w1") -> None:
    scene.feed(heartbeat(hostname, at, processed=processed), arrival=at)


def starts(scene: Scene, first: int, count: int, at: float, hostname: str = "celery@w1") -> None:
    for uuid in (f"t{first + i}" for i in range(count)):
        run(scene, uuid, at, hostname)


def missed(scene: Scene) -> float | None:
    return scene.value("celery_exporter_events_missed_total")


def test_nothing_is_missed_when_every_start_arrives_even_after_its_heartbeat() -> None:
    scene = Scene()
    beat(scene, 100.0, processed=50)
    starts(scene, 0, 10, 101.0)
    # A buffered batch stamped before the heartbeat arrives after it.
    beat(scene, 102.0, processed=30 + 50)
    starts(scene, 10, 20, 101.5)
    starts(scene, 30, 5, 103.0)
    beat(scene, 104.0, processed=85)
    beat(scene, 106.0, processed=85)
    assert missed(scene) == 0


def test_starts_stamped_before_the_first_heartbeat_are_not_counted_as_extra() -> None:
    scene = Scene()
    beat(scene, 100.0, processed=10)
    starts(scene, 0, 10, 99.0)  # already in the baseline's count
    beat(scene, 102.0, processed=12)
    starts(scene, 10, 2, 101.0)
    beat(scene, 104.0, processed=12)
    assert missed(scene) == 0


def test_lost_starts_are_counted_once_when_the_next_heartbeat_confirms_them() -> None:
    scene = Scene()
    beat(scene, 100.0, processed=0)
    starts(scene, 0, 10, 101.0)
    beat(scene, 102.0, processed=10)
    # 300 tasks start while the exporter is away: their events and heartbeats are lost.
    beat(scene, 112.0, processed=310)
    assert missed(scene) == 0  # judged only when the next heartbeat arrives
    starts(scene, 310, 5, 113.0)
    beat(scene, 114.0, processed=315)
    assert missed(scene) == 300
    beat(scene, 116.0, processed=315)
    assert missed(scene) == 300


def test_a_restart_starts_a_new_baseline() -> None:
    scene = Scene()
    beat(scene, 100.0, processed=500)
    starts(scene, 0, 1, 101.0)
    beat(scene, 102.0, processed=501)
    beat(scene, 104.0, processed=0)  # restarted: processed fell
    starts(scene, 1, 4, 105.0)
    beat(scene, 106.0, processed=4)
    beat(scene, 108.0, processed=4)
    assert missed(scene) == 0


def test_one_corrupt_heartbeat_adds_nothing() -> None:
    scene = Scene()
    beat(scene, 100.0, processed=5)
    starts(scene, 0, 1, 101.0)
    beat(scene, 102.0, processed=6)
    beat(scene, 104.0, processed=9_000_000_000)
    beat(scene, 106.0, processed=6)  # back to the truth: the jump was never judged
    beat(scene, 108.0, processed=6)
    assert missed(scene) == 0


def test_what_one_heartbeat_can_add_is_bounded() -> None:
    scene = Scene()
    beat(scene, 100.0, processed=0)
    starts(scene, 0, 1, 101.0)
    beat(scene, 102.0, processed=9_000_000_000)
    beat(scene, 104.0, processed=9_000_000_000)
    assert missed(scene) == 2 * MAX_STARTS_PER_SECOND


def test_a_worker_with_task_events_off_misses_nothing() -> None:
    scene = Scene()
    for index in range(5):
        beat(scene, 100.0 + 2 * index, processed=100 * index)
    assert missed(scene) == 0


def test_workers_are_judged_apart_and_clock_skew_does_not_matter() -> None:
    scene = Scene()
    skew = -7200.0  # w2's clock is two hours behind
    beat(scene, 100.0, processed=0)
    beat(scene, 100.0 + skew, processed=0, hostname="celery@w2")
    starts(scene, 0, 3, 101.0)
    starts(scene, 100, 1, 101.0 + skew, hostname="celery@w2")
    beat(scene, 102.0, processed=3)
    beat(scene, 102.0 + skew, processed=4, hostname="celery@w2")  # 3 of w2's starts lost
    beat(scene, 104.0, processed=3)
    beat(scene, 104.0 + skew, processed=4, hostname="celery@w2")
    assert missed(scene) == 3


def test_a_start_held_for_its_name_counts_when_it_arrives_not_when_it_applies() -> None:
    scene = Scene()
    beat(scene, 100.0, processed=0)
    run(scene, "t0", 101.0)
    # Its task-received was lost: the start waits for a name that never comes.
    scene.feed(started("orphan", 101.0), arrival=101.0)
    beat(scene, 102.0, processed=2)
    beat(scene, 104.0, processed=2)  # judges the heartbeat at 102: both starts arrived
    scene.tracker.tick(104.0)  # the held start applies now, under the name "unknown"
    beat(scene, 106.0, processed=2)
    assert missed(scene) == 0
    assert scene.value("celery_task_started_total", name="unknown", queue="celery", **W1) == 1
