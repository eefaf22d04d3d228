"""Capacity rules, alerts, dashboard and the autoscaling document against a live Prometheus.

Two real workers on the suite's Redis serve the queue ``celery`` with 2 and
1 pool slots and a prefetch multiplier of 1; a burst of long tasks that are
acknowledged late fills every slot, so exactly 3 run and the rest wait in
the broker. A queue nobody consumes holds a few messages. The exporter
inspects the workers every second and Prometheus (``tests.test_live_prometheus``)
scrapes it every second with the rules loaded, every ``for:`` cut to 5 s.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.celery_app import make_app
from tests.conftest import WorkerFactory
from tests.harness import ExporterProcess
from tests.servers import RedisServer
from tests.test_live_prometheus import (
    JOB,
    VARIABLES,
    Prometheus,
    has_data,
    panel_targets,
    substitute_variables,
    wait_for_alert,
    wait_for_rules,
    wait_for_value,
)

ROOT = Path(__file__).resolve().parent.parent
AUTOSCALING = ROOT / "docs" / "autoscaling.md"
REDIS_DB = 9  # its own database: its own queues and event channel
QUEUE = "celery"  # the queue docs/autoscaling.md scales on
OTHER_QUEUE = "reports"
ORPHAN = "orphaned"
SLOTS = (2, 1)
BURST = 8
ORPHANED_MESSAGES = 4
RUNNING = sum(SLOTS)
WAITING = BURST - RUNNING
CAPACITY_PANELS = (
    "Utilisation",
    "Utilisation per worker",
    "Utilisation in total",
    "Pool slots and running tasks",
    "Utilisation per queue",
    "Queues and their workers",
    "Workers by queue",
    "Pool slots per worker",
    "Prefetch limit per worker",
)


@dataclass
class Live:
    prometheus: Prometheus
    workers: tuple[str, ...]


@pytest.fixture(scope="module")
def live(
    redis_server: RedisServer,
    module_worker_factory: WorkerFactory,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Live]:
    """Both workers full, the rest of the burst waiting, and the orphaned queue filled."""
    broker_url = redis_server.url_for(REDIS_DB)
    redis_server.client(REDIS_DB).flushdb()
    exporter = ExporterProcess(["--broker-url", broker_url, "--inspect-interval", "1",
                                "--queue-poll-interval", "1", "--queues", ORPHAN])  # fmt: skip
    prometheus = None
    workers = []
    try:
        exporter.wait_serving()
        queues = ((QUEUE,), (QUEUE, OTHER_QUEUE))
        for slots, consumed in zip(SLOTS, queues, strict=True):
            workers.append(module_worker_factory(
                broker_url, concurrency=slots, queues=consumed,
                extra_args=("--prefetch-multiplier", "1"),
            ))  # fmt: skip
        prometheus = Prometheus(tmp_path_factory.mktemp("prometheus"), exporter.port)
        app = make_app(broker_url, sent_events=False)
        for _ in range(BURST):
            app.send_task("tests.sleep_late", (120,), queue=QUEUE)
        for number in range(ORPHANED_MESSAGES):
            app.send_task("tests.add", (number, 1), queue=ORPHAN)
        wait_for_value(prometheus, f'queue:celery_worker_tasks_active:sum{{queue="{QUEUE}"}}',
                       RUNNING)  # fmt: skip
        wait_for_value(prometheus, f'queue:celery_queue_length:max{{queue="{QUEUE}"}}', WAITING)
        wait_for_rules(prometheus)
        yield Live(prometheus, tuple(worker.hostname for worker in workers))
    finally:
        if prometheus is not None:
            prometheus.stop()
        exporter.stop()
        for worker in workers:  # no warm shutdown: their tasks sleep for minutes
            worker.kill()


def test_pool_sizes_and_queue_coverage_reach_prometheus(live: Live) -> None:
    for hostname, slots in zip(live.workers, SLOTS, strict=True):
        wait_for_value(
            live.prometheus, f'hostname:celery_worker_pool_size:max{{hostname="{hostname}"}}', slots
        )
    wait_for_value(live.prometheus, f'queue:celery_queue_workers:max{{queue="{QUEUE}"}}', 2)
    wait_for_value(live.prometheus, f'queue:celery_queue_workers:max{{queue="{OTHER_QUEUE}"}}', 1)
    wait_for_value(live.prometheus, f'queue:celery_queue_workers:max{{queue="{ORPHAN}"}}', 0)
    wait_for_value(live.prometheus, f'queue:celery_worker_pool_size:sum{{queue="{QUEUE}"}}',
                   RUNNING)  # fmt: skip


def test_a_burst_of_long_tasks_fills_every_slot(live: Live) -> None:
    for hostname in live.workers:
        wait_for_value(
            live.prometheus, f'hostname:celery_worker_utilisation:ratio{{hostname="{hostname}"}}', 1
        )
    wait_for_value(live.prometheus, f'queue:celery_worker_utilisation:ratio{{queue="{QUEUE}"}}', 1)
    wait_for_value(live.prometheus, f'job:celery_worker_utilisation:ratio{{job="{JOB}"}}', 1)


def test_a_queue_nobody_consumes_raises_queue_no_workers(live: Live) -> None:
    wait_for_value(live.prometheus, f'queue:celery_queue_length:max{{queue="{ORPHAN}"}}',
                   ORPHANED_MESSAGES)  # fmt: skip
    wait_for_alert(live.prometheus, "CeleryQueueNoWorkers", queue=ORPHAN)
    assert live.prometheus.alerts("CeleryQueueNoWorkers", queue=QUEUE) == []


@pytest.mark.parametrize("title", CAPACITY_PANELS)
def test_capacity_panel_shows_data(live: Live, title: str) -> None:
    targets = panel_targets("celery-capacity", title)
    assert targets, f"no panel titled {title!r} on the capacity dashboard"
    empty = [
        f"{ref}: {expr}"
        for ref, expr in targets
        if not has_data(live.prometheus.query(substitute_variables(expr, VARIABLES)))
    ]
    assert not empty, f"panel {title!r} shows no data:\n" + "\n".join(empty)


# ----------------------------------------------------------- docs/autoscaling.md

FENCED = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)
# What each documented query measures, told by the rules it reads; its value
# for the burst: 3 running in 3 slots, 5 waiting.
EXPECTED = {
    "load per slot": (WAITING + RUNNING) / RUNNING,
    "backlog per slot": WAITING / RUNNING,
    "utilisation": 1.0,
    "demand in tasks": WAITING + RUNNING,
}


def kind_of(query: str) -> str:
    if "utilisation" in query:
        return "utilisation"
    if "pool_size" in query:
        return "load per slot" if "tasks_active" in query else "backlog per slot"
    return "demand in tasks"


def yaml_queries(node: Any) -> Iterator[str]:
    """Every KEDA ``query`` and adapter ``metricsQuery`` in a YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("query", "metricsQuery") and isinstance(value, str):
                yield value
            else:
                yield from yaml_queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from yaml_queries(item)


def documented_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every query in the document, adapter templates filled in."""
    found = []
    for number, (language, text) in enumerate(FENCED.findall(AUTOSCALING.read_text()), 1):
        if language == "promql":
            found.append((f"block {number} (promql)", text))
        elif language == "yaml":
            for query in yaml_queries(yaml.safe_load(text)):
                filled = query.replace("<<.LabelMatchers>>", f'queue="{QUEUE}"')
                found.append((f"block {number} (yaml)", filled))
    return found


def test_the_document_holds_every_kind_of_query() -> None:
    queries = documented_queries()
    kinds = [kind_of(query) for _, query in queries]
    assert set(kinds) == set(EXPECTED), kinds
    # The KEDA trigger, the scale-from-zero trigger and the adapter rule.
    assert sum(where.endswith("(yaml)") for where, _ in queries) == 3


@pytest.mark.parametrize(("where", "query"), documented_queries())
def test_documented_query_gives_the_expected_value(live: Live, where: str, query: str) -> None:
    expected = EXPECTED[kind_of(query)]
    wait_for_value(live.prometheus, query, expected)
