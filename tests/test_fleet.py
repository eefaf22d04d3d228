"""Task series on fleets: the hostname of task families dropped or rewritten at the source.

Three exporters read the same stream, one per mode, while real workers named
like the pods of one Deployment run the same tasks: dropped and rewritten
series must sum exactly to those kept per worker.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from exporter import config
from exporter.telemetry.metrics import TASK_HOST_FAMILIES
from tests.celery_app import make_app
from tests.events import Scene, failed, heartbeat, received, sent, started, succeeded
from tests.harness import InProcessExporter, wait_up
from tests.servers import wait_for

DEPLOYMENT = r"^(celery@.+)-[0-9a-f]{8,10}-[0-9a-z]{5}$=\1"
STATEFULSET = r"^(celery@.+)-[0-9]+$=\1"
PODS = ("celery@web-7d9f8b6c4-x2kqp", "celery@web-7d9f8b6c4-b8n2m", "celery@web-5c6b7f9d8-q4wz7")
Sums = dict[tuple[str, frozenset], float]


def test_drop_stores_task_series_without_the_worker_and_keeps_worker_series() -> None:
    scene = Scene(task_hostname_label="drop")
    for number, pod in enumerate(PODS):
        uuid = f"t{number}"
        scene.feed(
            heartbeat(pod, 10.0),
            sent(uuid, "app.add", "celery", 10.0),
            received(uuid, "app.add", 10.1, hostname=pod),
            started(uuid, 10.2, hostname=pod),
            succeeded(uuid, 10.5, 0.3, hostname=pod),
        )
    done = {"name": "app.add", "queue": "celery"}
    assert scene.value("celery_task_succeeded_total", **done) == 3
    assert scene.value("celery_task_received_total", **done) == 3
    assert scene.tracker._succeeded.values == {("app.add", "celery"): 3.0}  # stored so, too
    assert [scene.value("celery_worker_up", hostname=pod) for pod in PODS] == [1, 1, 1]


def test_the_rewrite_folds_pods_and_a_pod_going_away_keeps_the_shared_series() -> None:
    scene = Scene(
        task_hostname_rewrite=_rules(DEPLOYMENT, STATEFULSET),
        worker_timeout=5.0,
        max_label_values=5,
    )
    hosts = (*PODS, "celery@reports-0", "celery@reports-1", "celery@laptop")
    for number, host in enumerate(hosts):
        scene.feed(
            heartbeat(host, 10.0),
            received(f"t{number}", "app.add", 10.1, hostname=host),
            failed(f"t{number}", 10.2, "ValueError('x')", hostname=host),
        )
    failures = {"name": "app.add", "queue": "celery", "exception": "ValueError"}
    # Five live workers fit the limit, the sixth folds; the task series take three values.
    assert scene.value("celery_task_failed_total", hostname="celery@web", **failures) == 3
    assert scene.value("celery_task_failed_total", hostname="celery@reports", **failures) == 2
    assert scene.value("celery_task_failed_total", hostname="other", **failures) == 1
    assert scene.value("celery_worker_up", hostname="celery@reports-1") == 1
    scene.feed(heartbeat(PODS[0], 20.0, kind="worker-offline"), arrival=1001.0)
    scene.tracker.tick(1010.0)  # said goodbye past --worker-timeout: purged
    assert scene.value("celery_worker_up", hostname=PODS[0]) is None
    assert scene.value("celery_task_failed_total", hostname="celery@web", **failures) == 3


@pytest.fixture
def three_modes(broker: Any) -> Iterator[dict[str, InProcessExporter]]:
    """Exporters on the same stream: hostname kept, dropped, and rewritten."""
    modes = {
        "keep": [],
        "drop": ["--task-hostname-label", "drop"],
        "rewrite": ["--task-hostname-rewrite", DEPLOYMENT],
    }
    running = {mode: InProcessExporter(["--broker-url", broker.url, *argv])
               for mode, argv in modes.items()}  # fmt: skip
    for exporter in running.values():
        wait_for(lambda e=exporter: e.sample("celery_exporter_broker_connected") == 1,
                 timeout=30, message="exporter never connected")  # fmt: skip
    yield running
    for exporter in running.values():
        exporter.stop()


def test_drop_and_rewrite_sum_exactly_to_keep_on_real_workers(
    broker: Any, three_modes: dict[str, InProcessExporter], worker_factory: Callable[..., Any]
) -> None:
    for pod in PODS:
        worker_factory(broker.url, name=pod, pool="threads", concurrency=2)
    for exporter in three_modes.values():
        for pod in PODS:
            wait_up(exporter, pod)
    app = make_app(broker.url)
    for i in range(12):
        app.send_task("tests.add", (i, i))
    for _ in range(4):
        app.send_task("tests.fail", ("boom",))
    app.send_task("tests.retry_then_succeed", (2,))
    app.send_task("tests.add", (1, 1), countdown=2, expires=1)  # revoked as expired

    keep, drop, rewrite = three_modes["keep"], three_modes["drop"], three_modes["rewrite"]
    expected = {
        ("celery_task_received_total", "tests.add"): 13,
        ("celery_task_started_total", "tests.add"): 12,
        ("celery_task_succeeded_total", "tests.add"): 12,
        ("celery_task_revoked_total", "tests.add"): 1,
        ("celery_task_failed_total", "tests.fail"): 4,
        ("celery_task_retried_total", "tests.retry_then_succeed"): 2,
        ("celery_task_succeeded_total", "tests.retry_then_succeed"): 1,
    }
    wait_for(
        lambda: _totals(keep, expected) == expected,
        timeout=90,
        message=lambda: f"keep: {_totals(keep, expected)}",
    )
    summed = _without_hostname(_task_samples(keep))
    wait_for(lambda: _task_samples(drop) == summed, timeout=30,
             message=lambda: f"drop {_task_samples(drop)} != keep summed {summed}")  # fmt: skip
    folded = {(name, labels | {("hostname", "celery@web")}): value
              for (name, labels), value in summed.items()}  # fmt: skip
    wait_for(lambda: _task_samples(rewrite) == folded, timeout=30,
             message=lambda: f"rewrite {_task_samples(rewrite)} != {folded}")  # fmt: skip
    assert {dict(labels)["hostname"] for _, labels in _task_samples(keep)} <= set(PODS)
    assert len({dict(labels)["hostname"] for _, labels in _task_samples(keep)}) > 1
    for exporter in (drop, rewrite):  # worker families keep the pods' own names
        assert [exporter.sample("celery_worker_up", {"hostname": pod}) for pod in PODS] == [1] * 3


def _totals(exporter: InProcessExporter, expected: dict) -> dict[tuple[str, str], float]:
    return {(metric, name): exporter.total(metric, name=name) for metric, name in expected}


def _rules(*texts: str) -> tuple[Any, ...]:
    argv = [item for text in texts for item in ("--task-hostname-rewrite", text)]
    return config.load(["--broker-url", "redis://x/0", *argv], environ={}).task_hostname_rewrite


def _task_samples(exporter: InProcessExporter) -> Sums:
    """The samples of the task families that carry the worker when kept."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in exporter.daemon.registry.collect()
        for sample in family.samples
        if sample.name in TASK_HOST_FAMILIES
    }


def _without_hostname(samples: Sums) -> Sums:
    summed: defaultdict[tuple[str, frozenset], float] = defaultdict(float)
    for (name, labels), value in samples.items():
        summed[name, frozenset((k, v) for k, v in labels if k != "hostname")] += value
    return dict(summed)
