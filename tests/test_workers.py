"""Worker liveness, judged by the daemon's clock with a controllable time."""

from __future__ import annotations

from tests.events import Scene, event, heartbeat, received, succeeded

W1 = {"hostname": "celery@w1"}


def test_heartbeat_sets_the_worker_gauges() -> None:
    scene = Scene()
    scene.feed(heartbeat("celery@w1", 50.0, active=3, processed=120), arrival=1000.0)
    assert scene.value("celery_worker_up", **W1) == 1
    assert scene.value("celery_worker_last_heartbeat_timestamp_seconds", **W1) == 1000.0
    assert scene.value("celery_worker_tasks_active", **W1) == 3
    assert scene.value("celery_worker_tasks_processed_total", **W1) == 120
    assert (
        scene.value(
            "celery_worker_info", sw_ident="py-celery", sw_ver="5.7.0", sw_sys="Linux", **W1
        )
        == 1
    )


def test_silence_past_the_timeout_means_down_whatever_the_worker_clock_says() -> None:
    scene = Scene(worker_timeout=30.0)
    # The worker's clock is an hour behind: only arrival times count.
    scene.feed(heartbeat("celery@w1", 1000.0 - 3600), arrival=1000.0)
    scene.tracker.tick(1029.0)
    assert scene.value("celery_worker_up", **W1) == 1
    scene.tracker.tick(1031.0)
    assert scene.value("celery_worker_up", **W1) == 0
    scene.feed(heartbeat("celery@w1", 1032.0 - 3600), arrival=1032.0)
    assert scene.value("celery_worker_up", **W1) == 1


def test_a_silent_worker_loses_all_its_series_after_the_purge_delay() -> None:
    scene = Scene(worker_timeout=30.0, purge_offline_after=600.0)
    scene.feed(
        heartbeat("celery@w1", 1000.0),
        received("a", "app.add", 1000.0),
        succeeded("a", 1001.0, 0.5),
        arrival=1000.0,
    )
    scene.tracker.tick(1599.0)
    assert scene.value("celery_worker_up", **W1) == 0
    assert scene.value("celery_task_succeeded_total", name="app.add", queue="celery", **W1) == 1
    scene.tracker.tick(1601.0)
    families = {
        sample.labels.get("hostname")
        for family in scene.registry.collect()
        for sample in family.samples
    }
    assert "celery@w1" not in families
    assert scene.tracker.workers.workers == {}


def test_a_worker_that_says_goodbye_is_down_at_once_and_forgotten_after_the_timeout() -> None:
    scene = Scene(worker_timeout=30.0)
    scene.feed(heartbeat("celery@w1", 1000.0), arrival=1000.0)
    scene.feed(event("worker-offline", 1005.0), arrival=1005.0)
    assert scene.value("celery_worker_up", **W1) == 0
    scene.tracker.tick(1031.0)
    assert scene.value("celery_worker_up", **W1) is None


def test_changed_software_replaces_the_info_series() -> None:
    scene = Scene()
    scene.feed(heartbeat("celery@w1", 1.0))
    scene.feed({**heartbeat("celery@w1", 2.0), "sw_ver": "5.8.0"})
    assert (
        scene.value(
            "celery_worker_info", sw_ident="py-celery", sw_ver="5.7.0", sw_sys="Linux", **W1
        )
        is None
    )
    assert (
        scene.value(
            "celery_worker_info", sw_ident="py-celery", sw_ver="5.8.0", sw_sys="Linux", **W1
        )
        == 1
    )
