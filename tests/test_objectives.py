"""Objectives, expected intervals and the last success: options, matching and gauges.

The tracker is driven with hand-made events, as in test_tracker; the options go
through the daemon's own configuration loader and command line.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from exporter import config
from tests.events import Scene, heartbeat, received, succeeded

ROOT = Path(__file__).resolve().parent.parent
BROKER = ["--broker-url", "redis://localhost:6379/0"]
OBJECTIVES = {"payments.*": 0.999, "payments.refund": 0.9, "*": 0.99}
INTERVALS = {"beat.hourly": 3600.0, "beat.*": 60.0}


def test_globs_keep_the_order_given_from_flags_environment_and_file(tmp_path: Path) -> None:
    loaded = config.load(
        [*BROKER, "--task-objective", "payments.*=0.999", "--task-objective", "*=0.99",
         "--task-expected-interval", "beat.hourly=3600"],
        environ={},
    )  # fmt: skip
    assert list(loaded.task_objectives.items()) == [("payments.*", 0.999), ("*", 0.99)]
    assert loaded.task_expected_intervals == {"beat.hourly": 3600.0}
    environ = {"CELERY_EXPORTER_TASK_OBJECTIVES": "b.*=0.9,a.*=0.5"}
    assert list(config.load(BROKER, environ=environ).task_objectives) == ["b.*", "a.*"]
    path = tmp_path / "exporter.yaml"
    path.write_text("task_objectives:\n  z.*: 0.95\n  '*': 0.9\ntask_expected_intervals:\n"
                    "  beat.[ab]: 30\n")  # fmt: skip
    loaded = config.load([*BROKER, "--config", str(path)], environ={})
    assert list(loaded.task_objectives.items()) == [("z.*", 0.95), ("*", 0.9)]
    assert loaded.task_expected_intervals == {"beat.[ab]": 30.0}
    assert config.load(BROKER, environ={}).task_objectives == {}


@pytest.mark.parametrize(
    ("argv", "file", "message"),
    [
        (["--task-objective", "a.*=1"], None,
         "task_objectives: 'a.*': expected a number above 0 and below 1, got '1' "
         "(from --task-objective)"),
        (["--task-objective", "a.*=0"], None, "task_objectives: 'a.*': expected a number above 0"),
        (["--task-objective", "a.*=-0.5"], None, "task_objectives: 'a.*': expected a number"),
        (["--task-objective", "a.*=99%"], None, "task_objectives: 'a.*': expected a number"),
        (["--task-objective", "a.[bc=0.9"], None,
         "task_objectives: 'a.[bc': not a glob: a '[' is never closed (from --task-objective)"),
        (["--task-objective", "=0.9"], None, "task_objectives: expected key=value, got '=0.9'"),
        (["--task-objective", "0.9"], None, "task_objectives: expected key=value, got '0.9'"),
        (None, "task_objectives:\n  '': 0.9\n",
         "task_objectives: expected a glob of task names, got an empty one (from "),
        (None, "task_objectives: [a.*]\n", "task_objectives: expected key=value, got 'a.*'"),
        (None, "task_objectives:\n  a.*: 1.5\n", "task_objectives: 'a.*': expected a number"),
        (["--task-expected-interval", "beat.*=0"], None,
         "task_expected_intervals: 'beat.*': expected a number above 0, got '0' "
         "(from --task-expected-interval)"),
        (["--task-expected-interval", "beat.*=-60"], None,
         "task_expected_intervals: 'beat.*': expected a number above 0, got '-60'"),
        (["--task-expected-interval", "beat.*=hourly"], None,
         "task_expected_intervals: 'beat.*': expected a number above 0, got 'hourly'"),
        (["--task-expected-interval", "[beat=60"], None,
         "task_expected_intervals: '[beat': not a glob: a '[' is never closed"),
    ],
)  # fmt: skip
def test_mistakes_name_the_key(
    tmp_path: Path, argv: list[str] | None, file: str | None, message: str
) -> None:
    argv = list(argv or [])
    if file is not None:
        path = tmp_path / "exporter.yaml"
        path.write_text(file)
        argv += ["--config", str(path)]
    with pytest.raises(config.ConfigError) as caught:
        config.load([*BROKER, *argv], environ={})
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_the_command_line_exits_2_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "exporter", *BROKER, "--task-objective", "payments.*=1.5"],
        capture_output=True, text=True, cwd=ROOT, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        "celery-events-exporter: error: task_objectives: 'payments.*': expected a number "
        "above 0 and below 1, got '1.5' (from --task-objective)\n"
    )


def see(scene: Scene, *names: str, arrival: float = 1000.0) -> None:
    """Each name received once, then the tick that matches new names."""
    for i, name in enumerate(names):
        scene.feed(received(f"{name}-{i}", name, 100.0 + i), arrival=arrival)
    scene.tracker.tick(arrival)


def test_each_name_seen_takes_the_first_glob_it_matches() -> None:
    scene = Scene(task_objectives=OBJECTIVES, task_expected_intervals=INTERVALS)
    see(scene, "payments.charge", "payments.refund", "mail.send", "beat.cleanup", "beat.hourly")
    objective = {
        name: scene.value("celery_task_objective_ratio", name=name)
        for name in ("payments.charge", "payments.refund", "mail.send", "beat.cleanup")
    }
    # payments.refund is spelt out, but payments.* comes first.
    assert objective == {"payments.charge": 0.999, "payments.refund": 0.999,
                         "mail.send": 0.99, "beat.cleanup": 0.99}  # fmt: skip
    assert scene.value("celery_task_expected_interval_seconds", name="beat.cleanup") == 60.0
    assert scene.value("celery_task_expected_interval_seconds", name="beat.hourly") == 3600.0
    assert scene.value("celery_task_expected_interval_seconds", name="mail.send") is None


def test_a_name_no_glob_matches_has_no_objective() -> None:
    scene = Scene(task_objectives={"payments.*": 0.999}, task_expected_intervals={"beat.?": 5})
    see(scene, "mail.send", "beat.10", "beat.1", "Payments.charge")
    assert scene.value("celery_task_objective_ratio", name="mail.send") is None
    assert scene.value("celery_task_objective_ratio", name="Payments.charge") is None  # case
    assert scene.value("celery_task_expected_interval_seconds", name="beat.10") is None
    assert scene.value("celery_task_expected_interval_seconds", name="beat.1") == 5.0


def test_names_given_literally_are_exported_before_they_are_seen() -> None:
    scene = Scene(task_objectives=OBJECTIVES, task_expected_intervals=INTERVALS)
    family = scene.metrics.gauge("celery_task_expected_interval_seconds")
    assert family.values == {("beat.hourly",): 3600.0}
    # Each name spelt out in either option is a task name: it takes what matches it.
    assert scene.metrics.gauge("celery_task_objective_ratio").values == {
        ("payments.refund",): 0.999,
        ("beat.hourly",): 0.99,
    }


def test_names_are_matched_at_the_tick_within_the_label_limit() -> None:
    scene = Scene(task_objectives={"*": 0.99}, max_label_values=2)
    scene.feed(received("a", "t.one", 100.0))
    assert scene.value("celery_task_objective_ratio", name="t.one") is None  # until the tick
    see(scene, "t.two", "t.three", "t.four")
    family = scene.metrics.gauge("celery_task_objective_ratio")
    assert family.values == {("t.one",): 0.99, ("t.two",): 0.99}  # the rest fold into other


def test_without_globs_nothing_is_matched_or_exported() -> None:
    scene = Scene()
    see(scene, "payments.charge")
    assert scene.tracker._targets is None
    assert scene.metrics.gauge("celery_task_objective_ratio").values == {}
    assert scene.metrics.gauge("celery_task_expected_interval_seconds").values == {}


LAST = "celery_task_last_succeeded_timestamp_seconds"


def test_the_last_success_is_the_worker_s_time_of_the_latest() -> None:
    scene = Scene()
    scene.feed(received("a", "beat.cleanup", 100.0), succeeded("a", 101.5, runtime=1.0))
    scene.feed(received("b", "beat.cleanup", 160.0), succeeded("b", 161.25, runtime=1.0))
    assert scene.value(LAST, name="beat.cleanup", queue="celery") == 161.25


def test_a_worker_clock_hours_ahead_reads_as_now() -> None:
    scene = Scene()
    before = time.time()
    scene.feed(received("a", "beat.cleanup", before), succeeded("a", before + 3 * 3600, 1.0))
    after = time.time()
    assert before <= scene.value(LAST, name="beat.cleanup", queue="celery") <= after


def test_a_purged_worker_leaves_the_last_success() -> None:
    scene = Scene(worker_timeout=10.0, purge_offline_after=60.0)
    scene.feed(heartbeat("celery@w1", 99.0), received("a", "beat.cleanup", 100.0),
               succeeded("a", 101.0, 1.0))  # fmt: skip
    scene.tracker.tick(1000.0 + 3600)  # celery@w1 is silent past --purge-offline-after
    assert scene.tracker.workers.workers == {}
    assert scene.value("celery_task_succeeded_total", name="beat.cleanup", queue="celery",
                       hostname="celery@w1") is None  # fmt: skip
    assert scene.value(LAST, name="beat.cleanup", queue="celery") == 101.0
