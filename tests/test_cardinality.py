"""Series and memory stay bounded under unique task names and unique worker names.

A long stream is fed to the tracker in this process, with the daemon's clock
advancing and ``tick`` running once a simulated second, as the pipeline does.
Every structure that grows with outside input is counted exactly; the
resident set gets a loose bound on top.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from exporter.track.labels import MAX_LENGTH, OTHER
from exporter.track.tracker import Tracker
from tests.events import Scene, heartbeat, received, sent, started, succeeded

CAP = 100
TASKS_PER_WORKER = 10
PER_WORKER = 1 + 4 * TASKS_PER_WORKER
"""Events per worker: worker-online, then sent, received, started, succeeded per task."""
EVENTS = 4880 * PER_WORKER
STEP = 0.05
"""Simulated seconds between events: 200k events span 10,000 s, many purge windows."""
PURGE_AFTER = 60.0


def worker_churn(count: int, start: float = 1000.0) -> Iterator[tuple[dict, float]]:
    """Workers with unique names, each online briefly, running tasks with unique names."""
    now = start
    emitted = worker = 0
    while emitted < count:
        host = f"celery@pod-{worker:06d}"
        batch = [heartbeat(host, now, kind="worker-online")]
        for index in range(TASKS_PER_WORKER):
            uuid = f"{worker}-{index}"
            name = f"app.task_{worker}_{index}"
            batch += [
                sent(uuid, name, f"q{index % 3}", now),
                received(uuid, name, now, host),
                started(uuid, now, host),
                succeeded(uuid, now, 0.01, host),
            ]
        for one in batch:
            if emitted == count:
                return
            yield one, now
            emitted += 1
            now += STEP
        worker += 1


def structures(tracker: Tracker) -> dict[str, int]:
    """Everything that holds one entry per outside value."""
    sizes = {f"seen:{label}": len(values) for label, values in tracker.label._seen.items()}
    sizes |= {
        "tasks": len(tracker.tasks),
        "workers": len(tracker.workers.workers),
        "queue_by_name": len(tracker._queue_by_name),
        "prefetched": len(tracker._prefetched),
    }
    sizes |= {name: len(family.values) for name, family in tracker.metrics.families.items()}
    return sizes


def rss_bytes() -> int:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(scene: Scene, stream: Iterator[tuple[dict, float]]) -> None:
    tracker = scene.tracker
    next_tick = 0.0
    for one, arrival in stream:
        tracker.handle(one, arrival)
        if arrival >= next_tick:
            tracker.tick(arrival)
            next_tick = arrival + 1.0


def test_unique_names_and_churning_workers_stay_bounded() -> None:
    scene = Scene(max_label_values=CAP, purge_offline_after=PURGE_AFTER, max_tracked_tasks=1000)
    stream = worker_churn(EVENTS)
    run(scene, (item for _, item in zip(range(EVENTS // 4), stream, strict=False)))
    quarter = structures(scene.tracker)
    rss_quarter = rss_bytes()
    run(scene, stream)
    end = structures(scene.tracker)

    tasks = EVENTS // PER_WORKER * TASKS_PER_WORKER
    # Task names: the first CAP are kept, every later one is folded, on task-sent and
    # task-received alike.
    assert end["seen:name"] == CAP
    folded = scene.metrics.counter("celery_exporter_label_values_folded_total")
    assert folded.get(("name",)) == 2 * (tasks - CAP)
    assert end["queue_by_name"] <= CAP + 1
    assert end["seen:queue"] == 3
    # Workers: a window of PURGE_AFTER holds ~30 of them; the rest were purged and
    # their label slots freed, so none was ever folded into "other".
    live = int(PURGE_AFTER / (STEP * PER_WORKER)) + 2
    assert folded.get(("hostname",)) == 0
    for key in ("workers", "prefetched", "seen:hostname", "celery_worker_up"):
        assert end[key] <= live, key
    assert scene.value("celery_worker_up", hostname=OTHER) is None
    # Nothing left in flight, nothing evicted.
    assert end["tasks"] == 0
    assert scene.value("celery_exporter_tracked_tasks_evicted_total") == 0
    # Flat: three quarters of the stream later, no structure has grown.
    grown = {
        key: (quarter.get(key, 0), size)
        for key, size in end.items()
        if size > max(quarter.get(key, 0), live)
    }
    assert grown == {}
    assert rss_bytes() - rss_quarter < 32 << 20


def test_unique_worker_names_beyond_the_cap_fold() -> None:
    """Workers that all stay within the purge window: the cap holds, the rest is 'other'."""
    scene = Scene(max_label_values=CAP, purge_offline_after=3600.0)
    workers = 1000
    for index in range(workers):
        scene.feed(heartbeat(f"celery@pod-{index}", 1000.0), arrival=1000.0)
    tracker = scene.tracker
    assert len(tracker.label._seen["hostname"]) == CAP
    assert len(tracker.workers.workers) == CAP + 1
    folded = scene.metrics.counter("celery_exporter_label_values_folded_total")
    assert folded.get(("hostname",)) == workers - CAP
    assert scene.value("celery_worker_up", hostname=OTHER) == 1
    assert len(scene.metrics.gauge("celery_worker_up").values) == CAP + 1

    # Once they are purged, their slots are free again for new workers.
    tracker.tick(1000.0 + 3601.0)
    assert tracker.workers.workers == {}
    assert tracker.label._seen["hostname"] == set()
    scene.feed(heartbeat("celery@new", 5000.0), arrival=5000.0)
    assert scene.value("celery_worker_up", hostname="celery@new") == 1


def test_long_label_values_are_cut() -> None:
    scene = Scene()
    name = "app." + "x" * 10_000
    scene.feed(sent("a", name, "q", 1.0), received("a", name, 1.0, "celery@" + "h" * 5000))
    labels = {
        "name": name[:MAX_LENGTH],
        "queue": "q",
        "hostname": ("celery@" + "h" * 5000)[:MAX_LENGTH],
    }
    assert scene.value("celery_task_received_total", **labels) == 1
    assert all(
        len(value) <= MAX_LENGTH
        for family in scene.metrics.families.values()
        for key in family.values
        for value in key
    )
