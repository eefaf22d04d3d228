"""Objectives, intervals and the last success from a real worker's events."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.celery_app import make_app
from tests.harness import WORKER_TIMEOUT, InProcessExporter, wait_up
from tests.servers import wait_for

OPTIONS = ["--task-objective", "tests.stamp=0.999", "--task-objective", "tests.*=0.99",
           "--task-expected-interval", "tests.stamp=60",
           "--task-expected-interval", "tests.nightly=86400"]  # fmt: skip


@pytest.fixture
def slo_exporter(broker: Any) -> Iterator[InProcessExporter]:
    running = InProcessExporter(
        ["--broker-url", broker.url, "--worker-timeout", str(WORKER_TIMEOUT), *OPTIONS]
    )
    wait_for(lambda: running.sample("celery_exporter_broker_connected") == 1, timeout=20,
             message="exporter never connected")  # fmt: skip
    yield running
    running.stop()


def test_gauges_of_the_tasks_seen_and_the_time_of_the_real_success(
    broker: Any, slo_exporter: InProcessExporter, worker_factory: Callable[..., Any],
    tmp_path: Path,
) -> None:  # fmt: skip
    exporter = slo_exporter
    # Given by name: exported before any task runs.
    assert (
        exporter.sample("celery_task_expected_interval_seconds", {"name": "tests.nightly"}) == 86400
    )
    worker = worker_factory(broker.url)
    wait_up(exporter, worker.hostname)
    app = make_app(broker.url)
    done = tmp_path / "done"
    app.send_task("tests.stamp", (str(done),))
    app.send_task("tests.fail", ("boom",))
    app.send_task("tests.add", (1, 2))

    def last() -> float:
        return exporter.sample("celery_task_last_succeeded_timestamp_seconds",
                               {"name": "tests.stamp", "queue": "celery"})  # fmt: skip

    wait_for(lambda: last() > 0 and done.exists(), timeout=60,
             message="no last success of tests.stamp")  # fmt: skip
    truth = float(done.read_text())
    assert abs(last() - truth) < 2.0, (last(), truth)
    wait_for(lambda: exporter.sample("celery_task_objective_ratio", {"name": "tests.add"}) > 0,
             timeout=10, message="no objective for tests.add")  # fmt: skip
    objective = {
        name: exporter.sample("celery_task_objective_ratio", {"name": name})
        for name in ("tests.stamp", "tests.fail", "tests.add")
    }
    assert objective == {"tests.stamp": 0.999, "tests.fail": 0.99, "tests.add": 0.99}
    interval = exporter.sample("celery_task_expected_interval_seconds", {"name": "tests.stamp"})
    assert interval == 60
    assert exporter.sample("celery_task_expected_interval_seconds", {"name": "tests.add"}) == 0
