"""In-flight figures set right by the workers' own view, with a controllable clock:
reconciliation with inspect replies and its races, workers paused or restarted, and
tasks held until their ETA."""

from __future__ import annotations

from typing import Any

import pytest

from exporter.track.reconcile import (
    COMMANDS,
    REASONS,
    SETTLE_SECONDS,
    InFlight,
    Reconciliation,
    WorkerView,
    requests,
)
from tests.events import Scene, event, heartbeat, received, sent, started, succeeded

ADD = {"name": "app.add", "queue": "celery"}
SLOW = {"name": "app.slow", "queue": "slow"}
W1 = {"hostname": "celery@w1"}


def info(uuid: str, name: str = "app.slow", queue: str = "slow", start: Any = None) -> dict:
    """A request as Celery's inspect commands list it."""
    return {
        "id": uuid,
        "name": name,
        "args": [1],
        "kwargs": {},
        "type": name,
        "hostname": "celery@w1",
        "time_start": start,
        "acknowledged": True,
        "delivery_info": {
            "exchange": "",
            "routing_key": queue,
            "priority": 0,
            "redelivered": False,
        },
        "worker_pid": 4242,
    }


class Rounds:
    """Inspect rounds fed by hand: the table's state before the broadcast, then replies."""

    def __init__(self, scene: Scene) -> None:
        self.scene = scene
        self.invalid: list[str] = []
        for reason in REASONS:  # as the inspector starts them
            scene.tracker.reconciled.inc((reason,), 0)

    def begin(self) -> InFlight:
        return InFlight.of(self.scene.tracker)

    def answer(
        self,
        before: InFlight,
        at: float,
        active: Any = (),
        reserved: Any = (),
        scheduled: Any = (),
        hostname: str = "celery@w1",
    ) -> None:
        """Replies built at ``at``, judged once they settled."""
        view = WorkerView()
        for command, reply in zip(COMMANDS, (active, reserved, scheduled), strict=True):
            reply = list(reply) if isinstance(reply, tuple) else reply
            found = requests(reply, self.invalid.append, scheduled=command == "scheduled")
            (view.active if command == "active" else view.waiting).extend(found)
            if type(reply) is list:
                view.answered.add(command)
        reconciliation = Reconciliation(at + SETTLE_SECONDS, before, {hostname: view})
        self.scene.tracker.reconciliations.append(reconciliation)

    def settle(self, at: float) -> None:
        self.scene.tracker.tick(at + SETTLE_SECONDS)

    def reconciled(self, reason: str) -> float | None:
        return self.scene.value("celery_exporter_tasks_reconciled_total", reason=reason)


def test_after_a_restart_running_and_waiting_tasks_come_from_the_workers_reply() -> None:
    scene, rounds = Scene(), None
    rounds = Rounds(scene)
    scene.feed(heartbeat("celery@w1", 1000.0), arrival=1000.0)
    before = rounds.begin()
    rounds.answer(
        before,
        1000.0,
        active=[info("a", start=900.0), info("b", start=950.0)],
        reserved=[info("c"), info("d", name="app.add", queue="celery")],
        scheduled=[{"eta": "2030-01-01T00:00:00+00:00", "priority": 6, "request": info("e")}],
    )
    scene.tracker.tick(1001.0)
    assert scene.value("celery_task_running", **SLOW) is None  # not settled yet
    rounds.settle(1000.0)
    assert scene.value("celery_task_running", **SLOW) == 2
    assert scene.value("celery_task_oldest_running_start_timestamp_seconds", **SLOW) == 900.0
    assert scene.value("celery_worker_tasks_prefetched", **W1) == 2
    assert scene.value("celery_worker_tasks_scheduled", **W1) == 1
    assert rounds.reconciled("running_unseen") == 2
    assert rounds.reconciled("waiting_unseen") == 3
    # Their later events count under their real name and queue.
    scene.feed(succeeded("a", 1010.0, 110.0), started("c", 1010.0), arrival=1010.0)
    scene.tracker.tick(1011.0)
    assert scene.value("celery_task_succeeded_total", **SLOW, **W1) == 1
    assert scene.value("celery_task_started_total", **SLOW, **W1) == 1
    assert scene.value("celery_task_running", **SLOW) == 2  # b, and c now
    assert scene.value("celery_task_oldest_running_start_timestamp_seconds", **SLOW) == 950.0
    assert scene.value("celery_worker_tasks_prefetched", **W1) == 1
    assert scene.value("celery_task_succeeded_total", name="unknown", queue="celery", **W1) is None


def test_a_lost_final_event_leaves_the_running_figures_once() -> None:
    scene = Scene()
    rounds = Rounds(scene)
    scene.feed(received("a", "app.add", 100.0), started("a", 100.0), arrival=100.0)
    scene.tracker.tick(101.0)
    assert scene.value("celery_task_running", **ADD) == 1
    before = rounds.begin()
    rounds.answer(before, 102.0, active=[])  # task-succeeded never arrives
    rounds.settle(102.0)
    assert scene.value("celery_task_running", **ADD) == 0
    assert rounds.reconciled("finished_unseen") == 1
    assert scene.value("celery_task_oldest_running_start_timestamp_seconds", **ADD) is None
    # The next round finds nothing more to correct.
    rounds.answer(rounds.begin(), 110.0, active=[])
    rounds.settle(110.0)
    assert rounds.reconciled("finished_unseen") == 1


def test_events_still_on_their_way_are_not_corrections() -> None:
    """A reply built before a task's start or end event arrived is judged once they did."""
    scene = Scene()
    rounds = Rounds(scene)
    scene.feed(received("done", "app.add", 100.0), started("done", 100.0), arrival=100.0)
    before = rounds.begin()
    # "done" finished before the reply; "new" started after the broadcast; "late"
    # started before the reply but its task-started arrives after it.
    rounds.answer(before, 101.0, active=[info("late", "app.add", "celery", start=100.5)])
    scene.feed(succeeded("done", 100.8, 0.8), arrival=101.5)
    scene.feed(received("new", "app.add", 101.2), started("new", 101.2), arrival=101.6)
    scene.feed(received("late", "app.add", 100.4), started("late", 100.5), arrival=102.0)
    rounds.settle(101.0)
    assert scene.value("celery_task_running", **ADD) == 2  # new, late
    for reason in ("finished_unseen", "running_unseen", "waiting_unseen", "left_unseen"):
        assert rounds.reconciled(reason) == 0, reason


def test_a_redelivered_execution_is_not_taken_for_the_one_before() -> None:
    scene = Scene()
    rounds = Rounds(scene)
    scene.feed(received("a", "app.add", 100.0), started("a", 100.0), arrival=100.0)
    before = rounds.begin()
    rounds.answer(before, 101.0, active=[])
    scene.feed(started("a", 102.0), arrival=102.0)  # started again meanwhile
    rounds.settle(101.0)
    assert scene.value("celery_task_running", **ADD) == 1
    assert rounds.reconciled("finished_unseen") == 0


def test_waiting_tasks_the_worker_no_longer_holds_leave_its_figures() -> None:
    scene = Scene()
    rounds = Rounds(scene)
    scene.feed(received("a", "app.add", 100.0), received("b", "app.add", 100.0), arrival=100.0)
    assert scene.value("celery_worker_tasks_prefetched", **W1) == 2
    rounds.answer(rounds.begin(), 101.0, reserved=[info("b", "app.add", "celery")])
    rounds.settle(101.0)
    scene.feed(heartbeat("celery@w1", 105.0), arrival=105.0)
    assert scene.value("celery_worker_tasks_prefetched", **W1) == 1
    assert rounds.reconciled("left_unseen") == 1


def test_a_worker_that_did_not_answer_every_command_is_not_judged() -> None:
    scene = Scene()
    rounds = Rounds(scene)
    scene.feed(received("a", "app.add", 100.0), started("a", 100.0), arrival=100.0)
    before = rounds.begin()
    view = WorkerView(answered={"active"})
    scene.tracker.reconciliations.append(Reconciliation(101.0, before, {"celery@w1": view}))
    scene.tracker.tick(101.0)
    rounds.answer(before, 101.0, active=[], reserved="nonsense")  # one reply unreadable
    rounds.settle(101.0)
    assert scene.value("celery_task_running", **ADD) == 1
    assert rounds.reconciled("finished_unseen") == 0
    assert rounds.invalid == ["wrong_type"]


@pytest.mark.parametrize(
    "start",
    [None, "yesterday", float("nan"), float("inf"), -5.0, 10**30, 5_000.0],
)
def test_a_hostile_start_time_never_gives_a_negative_age(start: Any) -> None:
    scene = Scene()
    rounds = Rounds(scene)
    rounds.answer(rounds.begin(), 1000.0, active=[info("a", start=start)])
    rounds.settle(1000.0)
    oldest = scene.value("celery_task_oldest_running_start_timestamp_seconds", **SLOW)
    assert oldest is not None and 0 < oldest <= 1000.0 + SETTLE_SECONDS


def test_hostile_replies_are_counted_and_left_out() -> None:
    scene = Scene(max_tracked_tasks=500, max_label_values=50)
    rounds = Rounds(scene)
    junk = [None, 5, {"id": 7}, {"id": ""}, {"id": "x" * 300}, {"name": "no id"}, ["a"]]
    many = [info(f"t{i}", name=f"app.n{i}", queue=f"q{i}", start=900.0) for i in range(10_000)]
    rounds.answer(rounds.begin(), 1000.0, active=junk + many, scheduled=[None, {"eta": 5}])
    rounds.settle(1000.0)
    assert rounds.invalid.count("missing_field") == len(junk) + 1
    assert rounds.invalid.count("wrong_type") == 1
    assert rounds.invalid.count("too_large") == 1  # the first 10,000 are read
    # Adopted tasks live in the bounded table, under bounded labels.
    assert len(scene.tracker.tasks) == 500
    assert scene.value("celery_exporter_tracked_tasks_evicted_total") == 10_000 - len(junk) - 500
    assert len({key[0] for key in scene.metrics.gauge("celery_task_running").values}) <= 51


def test_a_reply_of_a_worker_past_the_label_limit_adopts_nothing_unbounded() -> None:
    scene = Scene(max_label_values=1)
    rounds = Rounds(scene)
    rounds.answer(rounds.begin(), 1000.0, active=[info("a", start=900.0)], hostname="celery@w1")
    rounds.answer(rounds.begin(), 1000.0, active=[info("b", start=900.0)], hostname="other")
    rounds.settle(1000.0)
    assert set(scene.metrics.gauge("celery_task_running").values) == {("app.slow", "slow")}


# Workers declared down: paused, restarted or gone.


def _running_on_w1(scene: Scene, at: float = 100.0) -> None:
    scene.feed(heartbeat("celery@w1", at, processed=5), arrival=at)
    for uuid in ("a", "b"):
        scene.feed(received(uuid, "app.add", at), started(uuid, at), arrival=at)


def test_a_paused_worker_that_comes_back_interrupts_nothing() -> None:
    scene = Scene(worker_timeout=5.0)
    _running_on_w1(scene)
    scene.tracker.tick(106.0)
    assert scene.value("celery_worker_up", **W1) == 0
    for at in range(108, 131, 2):  # back, and beating again
        scene.feed(heartbeat("celery@w1", at + 0.5, processed=7), arrival=at + 0.5)
        scene.tracker.tick(at + 1.0)
    assert scene.value("celery_worker_up", **W1) == 1
    assert scene.value("celery_task_interrupted_total", **ADD, **W1) is None
    assert scene.value("celery_task_running", **ADD) == 2


def test_a_worker_silent_past_the_grace_interrupts_its_tasks_exactly() -> None:
    """Down after worker_timeout (5 s), interrupted after 10 s more (the grace's floor)."""
    scene = Scene(worker_timeout=5.0)
    _running_on_w1(scene)
    scene.tracker.tick(106.0)
    scene.tracker.tick(115.0)
    assert scene.value("celery_task_interrupted_total", **ADD, **W1) is None
    scene.tracker.tick(116.0)
    assert scene.value("celery_task_interrupted_total", **ADD, **W1) == 2
    assert scene.value("celery_task_running", **ADD) == 0
    scene.tracker.tick(200.0)
    assert scene.value("celery_task_interrupted_total", **ADD, **W1) == 2


@pytest.mark.parametrize(
    "comeback",
    [
        heartbeat("celery@w1", 109.0, processed=0, pid=200),
        heartbeat("celery@w1", 109.0, processed=1),
        heartbeat("celery@w1", 109.0, processed=0, pid=200, kind="worker-online"),
    ],
    ids=["new pid", "processed reset", "online"],
)
def test_a_worker_back_as_a_new_process_interrupts_at_once(comeback: dict) -> None:
    scene = Scene(worker_timeout=5.0)
    _running_on_w1(scene)
    scene.tracker.tick(106.0)
    scene.feed(comeback, arrival=109.0)
    assert scene.value("celery_task_interrupted_total", **ADD, **W1) == 2
    scene.tracker.tick(110.0)
    assert scene.value("celery_task_running", **ADD) == 0


def test_a_worker_started_again_before_its_timeout_interrupts_what_it_ran() -> None:
    scene = Scene(worker_timeout=30.0)
    _running_on_w1(scene)
    scene.feed(heartbeat("celery@w1", 102.0, kind="worker-online", pid=300), arrival=102.0)
    assert scene.value("celery_task_interrupted_total", **ADD, **W1) == 2
    # A consumer that reconnects sends worker-online from the same process: nothing.
    scene.feed(received("c", "app.add", 103.0), started("c", 103.0), arrival=103.0)
    scene.feed(heartbeat("celery@w1", 104.0, kind="worker-online", pid=300), arrival=104.0)
    assert scene.value("celery_task_interrupted_total", **ADD, **W1) == 2


# Tasks held until their ETA.


def test_a_countdown_task_is_scheduled_until_its_eta_then_waits_from_it() -> None:
    scene = Scene()
    eta = "1970-01-01T00:01:46+00:00"  # 106.0
    scene.feed(sent("a", "app.add", "celery", 100.0, eta=eta), arrival=100.0)
    scene.feed(received("a", "app.add", 100.1, eta=eta), arrival=100.1)
    scene.feed(heartbeat("celery@w1", 101.0), arrival=101.0)
    assert scene.value("celery_worker_tasks_scheduled", **W1) == 1
    assert scene.value("celery_worker_tasks_prefetched", **W1) == 0
    scene.tracker.tick(106.5)
    assert scene.value("celery_worker_tasks_scheduled", **W1) == 0
    assert scene.value("celery_worker_tasks_prefetched", **W1) == 1
    scene.feed(started("a", 106.2), arrival=106.6)
    assert scene.value("celery_worker_tasks_prefetched", **W1) == 0
    total = scene.value("celery_task_prefetch_wait_seconds_sum", **ADD)
    assert total == pytest.approx(0.2)


@pytest.mark.parametrize("retried_first", [True, False], ids=["retried first", "received first"])
def test_a_retry_with_a_countdown_is_scheduled_and_its_wait_runs_from_its_eta(
    retried_first: bool,
) -> None:
    """Celery reports the retry when the pool hands it back: the retry's own delivery
    may be received before it."""
    scene = Scene()
    scene.feed(received("a", "app.add", 100.0), started("a", 100.0), arrival=100.0)
    retried = event("task-retried", 100.55, uuid="a", exception="RuntimeError('again')")
    delivery = received("a", "app.add", 100.5, eta="1970-01-01T00:04:40.500000+00:00", retries=1)
    # retried with the default countdown, 180 s
    scene.feed(*((retried, delivery) if retried_first else (delivery, retried)), arrival=100.6)
    scene.feed(heartbeat("celery@w1", 101.0), arrival=101.0)
    assert scene.value("celery_worker_tasks_scheduled", **W1) == 1
    assert scene.value("celery_worker_tasks_prefetched", **W1) == 0
    scene.feed(started("a", 280.6), arrival=280.6)
    scene.feed(heartbeat("celery@w1", 281.0), arrival=281.0)
    assert scene.value("celery_worker_tasks_scheduled", **W1) == 0
    assert scene.value("celery_task_prefetch_wait_seconds_count", **ADD) == 2
    assert scene.value("celery_task_prefetch_wait_seconds_sum", **ADD) == pytest.approx(0.1)
    scene.tracker.tick(281.0)
    assert scene.value("celery_task_running", **ADD) == 1  # the retry runs, and only it


def test_an_eta_already_past_at_receipt_is_prefetched() -> None:
    scene = Scene()
    scene.feed(received("a", "app.add", 100.0, eta="1970-01-01T00:01:30+00:00"), arrival=100.0)
    assert scene.value("celery_worker_tasks_prefetched", **W1) == 1
    assert scene.value("celery_worker_tasks_scheduled", **W1) is None
