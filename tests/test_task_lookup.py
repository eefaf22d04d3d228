"""Task lookups from the tracker's own records: what a record keeps, what the API refuses,
what the store costs, and the 15-minute timings of the history."""

from __future__ import annotations

import gc
import time
import tracemalloc
from bisect import bisect_left
from typing import Any

import orjson
import pytest

from exporter.track.tracker import RECENTLY_FINISHED
from exporter.web.overview import FailureRing, History, quantile
from exporter.web.tasks import MAX_LIMIT, TaskLookup
from tests.events import Scene, event, failed, received, sent, started, succeeded

MEMORY_BOUND = 20_000_000
"""Bytes the tracker may hold after 100,000 tasks at the default, as the README states."""
TRACEBACK = (
    "".join(
        f'  File "/srv/app/orders/tasks.py", line {100 + line}, in step_{line}\n'
        f"    result = client.call(order_id, attempt={line})\n"
        for line in range(12)
    )
    + "ConnectionError: upstream refused the connection\n"
)


def real(one: dict[str, Any]) -> dict[str, Any]:
    """The event as the exporter decodes it from the wire: fresh objects, as orjson makes."""
    return orjson.loads(orjson.dumps(one))


def lifecycle(index: int, at: float) -> list[dict[str, Any]]:
    """A task's events as a prefork worker sends them: 3 % fail, 2 % retry once first."""
    uuid = f"{index:08x}-7c1d-4c4e-9b1f-{index:012x}"
    name, host = f"app.orders.task_{index % 20}", f"celery@worker-{index % 50}.prod.internal"
    args = f"({index}, 'order-{index:06d}', {{'customer': 'c-{index}', 'lines': [1, 2, 3]}})"
    events = [
        sent(uuid, name, "orders", at, args=args * 8, kwargs="{'priority': 'normal'}" * 8),
        received(uuid, name, at + 0.01, host, args=args * 8, kwargs="{}"),
        started(uuid, at + 0.02, host),
    ]
    if index % 50 == 7:
        events.append(
            event(
                "task-retried",
                at + 0.03,
                host,
                uuid=uuid,
                exception="ConnectionError('upstream refused the connection')",
                traceback=TRACEBACK,
            )
        )
        events += [received(uuid, name, at + 0.04, host), started(uuid, at + 0.05, host)]
    if index % 100 < 3:
        events.append(
            failed(
                uuid,
                at + 0.3,
                "ConnectionError('upstream refused the connection')",
                host,
                traceback=TRACEBACK,
            )
        )
    else:
        events.append(succeeded(uuid, at + 0.3, 0.28, host) | {"result": repr(args) * 4})
    return [real(one) for one in events]


def feed(scene: Scene, tasks: int) -> None:
    for index in range(tasks):
        for one in lifecycle(index, 1000.0 + index * 0.001):
            scene.tracker.handle(one, one["timestamp"])


def held_after(tasks: int, **options: Any) -> int:
    """Bytes allocated and still held once ``tasks`` tasks went through a fresh tracker."""
    gc.collect()
    tracemalloc.start()
    try:
        scene = Scene(**options)
        feed(scene, tasks)
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(scene.tracker._finished) == RECENTLY_FINISHED
    return held


def test_100000_tasks_through_the_store_stay_within_the_stated_bound() -> None:
    with_lookups = held_after(100_000, recent_tasks=10_000, on_failure=FailureRing(100).record)
    without = held_after(100_000, recent_tasks=0, on_failure=FailureRing(100).record)
    assert with_lookups < MEMORY_BOUND
    assert with_lookups - without < MEMORY_BOUND / 2


def test_a_record_keeps_neither_arguments_nor_results_nor_tracebacks() -> None:
    ring = FailureRing(100)
    scene = Scene(recent_tasks=10_000, on_failure=ring.record)
    feed(scene, 100)
    lookup = TaskLookup(scene.tracker, ring, 10_000)
    kept = [task.final for _, task in scene.tracker._finished.items()]
    kept += [
        task.retried[1] for _, task in scene.tracker._finished.items() if hasattr(task, "retried")
    ]
    text = orjson.dumps(kept).decode()
    assert "order-0000" not in text and "customer" not in text and "File " not in text
    code, record = lookup.answer("/api/v1/tasks/00000007-7c1d-4c4e-9b1f-000000000007", "")
    assert code == 200
    assert record["state"] == "succeeded"
    assert (record["retries"], record["exception"]) == (1, "ConnectionError")
    assert record["runtime"] == 0.28
    assert record["worker"] == "celery@worker-7.prod.internal"
    code, record = lookup.answer("/api/v1/tasks/00000001-7c1d-4c4e-9b1f-000000000001", "")
    assert (record["state"], record["runtime"]) == ("failed", pytest.approx(0.28))
    assert record["traceback"].endswith("ConnectionError: upstream refused the connection\n")


def test_lookups_off_chain_nothing_and_keep_the_table_for_late_events() -> None:
    on, off = Scene(recent_tasks=10_000), Scene(recent_tasks=0)
    for kind, handler in off.tracker._on_task.items():
        assert handler.__name__ != "traced", kind
    assert on.tracker._on_task["task-succeeded"].__name__ == "traced"
    feed(off, RECENTLY_FINISHED + 10)
    assert len(off.tracker._finished) == RECENTLY_FINISHED
    assert not hasattr(next(iter(off.tracker._finished.values())), "final")


def test_a_full_store_drops_the_oldest_finished_never_a_task_in_flight() -> None:
    scene = Scene(recent_tasks=20_000, max_tracked_tasks=100)
    lookup = TaskLookup(scene.tracker, None, 20_000)
    scene.feed(sent("waiting", "app.slow", "orders", 1.0), received("waiting", "app.slow", 1.1))
    feed(scene, 20_005)
    assert len(scene.tracker._finished) == 20_000
    assert lookup.find("waiting")["state"] == "received"  # type: ignore[index]
    assert lookup.find("00000000-7c1d-4c4e-9b1f-000000000000") is None  # the oldest went
    assert lookup.find("00000005-7c1d-4c4e-9b1f-000000000005")["state"] == "succeeded"  # type: ignore[index]
    # Fewer served than the tracker keeps for late events: only the newest are found.
    small = TaskLookup(scene.tracker, None, 10)
    assert small.find("00004e1a-7c1d-4c4e-9b1f-000000004e1a") is None
    assert small.find("00004e1b-7c1d-4c4e-9b1f-000000004e1b") is not None
    assert len(small.search("limit=500")["items"]) == 10 + 1  # and the one in flight


def test_bad_queries_are_refused_with_the_parameter_named_and_large_ones_capped() -> None:
    scene = Scene(recent_tasks=10_000)
    feed(scene, 2_000)
    lookup = TaskLookup(scene.tracker, None, 10_000)
    refused = {
        "limit=1000000000000000": "limit",
        "limit=0": "limit",
        "limit=-1": "limit",
        "limit=ten": "limit",
        "state=lost": "state",
        "color=red": "unknown parameter",
        "name=a&name=b": "twice",
        "name=" + "x" * 300: "name",
        "id=" + "x" * 300: "id",
        "id=": "id",
        "x=1&" * 600: "longer than",
        "&".join(f"name={n}" for n in range(6)): "at most 5 parameters",
    }
    for query, named in refused.items():
        code, answer = lookup.answer("/api/v1/tasks", query)
        assert code == 400 and named in answer["error"], query
    assert lookup.answer("/api/v1/tasks/" + "x" * 300, "")[0] == 400
    assert lookup.answer("/api/v1/tasks/no-such-task", "") == (404, {"error": "no such task"})
    code, answer = lookup.answer("/api/v1/tasks", "limit=999999999")
    assert (code, answer["limit"], len(answer["items"])) == (200, MAX_LIMIT, MAX_LIMIT)
    # A glob of thousands of stars is matched at once, in linear time.
    began = time.perf_counter()
    code, answer = lookup.answer("/api/v1/tasks", "name=" + "*a" * 99 + "b")
    assert (code, answer["items"]) == (200, [])
    assert time.perf_counter() - began < 1.0
    code, answer = lookup.answer("/api/v1/tasks", "name=*task_[12]&state=failed&limit=5")
    assert len(answer["items"]) == 5
    assert {(r["name"], r["state"]) for r in answer["items"]} == {
        ("app.orders.task_1", "failed"),
        ("app.orders.task_2", "failed"),
    }
    ends = [record["ended"] for record in answer["items"]]
    assert ends == sorted(ends, reverse=True)


def test_the_history_gives_percentiles_of_the_window_and_of_each_interval() -> None:
    scene = Scene()

    class Health:
        events_received = 0

    history = History(scene.metrics, Health())  # type: ignore[arg-type]
    runtime = scene.metrics.histogram("celery_task_runtime_seconds")
    backlog = scene.metrics.gauge("celery_queue_length")
    history.sample(0.0)
    for second in range(10, 1200, 10):
        for index in range(10):
            runtime.observe(("t", "q"), 0.01 * (index + 1) + (1.0 if second > 900 else 0.0))
        backlog.set(("q",), second)
        history.sample(float(second))
    view = history.timings_view()
    assert len(view["time"]) == 90 and view["time"][-1] == 1190.0
    assert view["backlog"][-1] == 1190.0
    assert view["queue_wait_p95"] == [None] * 90  # nothing waited in the window
    recent = [0] * (len(runtime.bounds) + 1)
    for index in range(10):
        recent[bisect_left(runtime.bounds, 1.0 + 0.01 * (index + 1))] += 1
    assert view["runtime_p95"][-1] == quantile(0.95, runtime.bounds, recent)
    assert view["runtime"]["count"] == 900  # 90 intervals of 10: none from before the window
