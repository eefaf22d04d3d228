"""The dashboards and alerts against a live Prometheus scraping the real daemon.

A Celery worker (events on) runs tasks on the suite's private Redis, the
exporter runs as its own process, and Debian's Prometheus scrapes it every
second with the project's rules loaded. The rules are a copy of
config/prometheus/alerts.yaml in which every group is evaluated every second
and every ``for:`` is 5 s; the 5-minute windows stay as they are, since
rate() over them needs only two samples. Every dashboard query and rule
expression must parse, the core panels must show data, and the alerts must
react to a burst of failures and to a killed worker.

Prometheus is required (Debian's ``prometheus`` package ships
/usr/bin/prometheus); a missing binary is a failure, never a skip.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.celery_app import make_app
from tests.conftest import WorkerFactory
from tests.harness import ExporterProcess, scrape
from tests.servers import RedisServer, free_port, wait_for
from tests.test_dashboards import (
    ALERTS,
    DASHBOARDS,
    all_panels,
    load,
    queries,
    substitute_variables,
)

JOB = "celery-events-exporter"
TASK = "tests.add"
FAILING_TASK = "tests.fail"
FAILURES = 30
SUCCESSES = 5
REDIS_DB = 11  # a database of its own: no other test's worker publishes here
TIMEOUT = 30.0  # seconds any one condition may take to show in Prometheus
# Dashboard variables: the concrete job and task; the built-ins as Grafana
# would set them for a 1 h range on a 15 s scrape; any other one (queue,
# hostname, instance) becomes ".*" inside its regex matcher.
# broker reads All (".*", its allValue), which matches this exporter's series: they
# have no broker label, as with one broker.
VARIABLES = {"job": JOB, "task": TASK, "broker": ".*", "__rate_interval": "1m",
             "__interval": "15s"}  # fmt: skip
ALL_TARGETS: tuple[str, ...] = ()
# (dashboard uid, panel title) -> refIds that must return data, ALL_TARGETS
# for every one. The throughput panels also plot retried, rejected and revoked
# tasks, which this traffic does not produce.
CORE_PANELS: dict[tuple[str, str], tuple[str, ...]] = {
    ("celery-overview", "Tasks succeeded"): ALL_TARGETS,
    ("celery-overview", "Failure ratio"): ALL_TARGETS,
    ("celery-overview", "Workers up"): ALL_TARGETS,
    ("celery-overview", "Queue backlog"): ALL_TARGETS,
    ("celery-overview", "p95 queue wait"): ALL_TARGETS,
    ("celery-overview", "Task throughput by state"): ("A", "B", "C", "D", "E"),
    ("celery-overview", "Failure ratio by task"): ALL_TARGETS,
    ("celery-overview", "Task runtime p50 / p95 / p99"): ALL_TARGETS,
    ("celery-overview", "Queue wait p50 / p95 / p99"): ALL_TARGETS,
    ("celery-overview", "Prefetch wait p50 / p95 / p99"): ALL_TARGETS,
    ("celery-overview", "p95 runtime by task"): ALL_TARGETS,
    ("celery-overview", "p95 queue wait by task"): ALL_TARGETS,
    ("celery-overview", "Workers up / down"): ALL_TARGETS,
    ("celery-overview", "Heartbeat age"): ALL_TARGETS,
    ("celery-overview", "Processed tasks per worker"): ALL_TARGETS,
    ("celery-overview", "Top failing tasks"): ALL_TARGETS,
    ("celery-overview", "Top exceptions"): ALL_TARGETS,
    ("celery-task", "Succeeded"): ALL_TARGETS,
    ("celery-task", "p95 runtime"): ALL_TARGETS,
    ("celery-task", "p95 queue wait"): ALL_TARGETS,
    ("celery-task", "Rates by state"): ("A", "B", "C", "D"),
    ("celery-task", "Runtime p50 / p95 / p99"): ALL_TARGETS,
    ("celery-task", "Queue wait p50 / p95 / p99"): ALL_TARGETS,
    ("celery-task", "Prefetch wait p50 / p95 / p99"): ALL_TARGETS,
    ("celery-task", "Succeeded by worker"): ALL_TARGETS,
    ("celery-task", "Received by queue"): ALL_TARGETS,
    ("celery-overview", "Error budgets"): ALL_TARGETS,
    ("celery-overview", "Periodic tasks"): ALL_TARGETS,
    ("celery-exporter", "Scrape up"): ALL_TARGETS,
    ("celery-exporter", "Broker connected"): ALL_TARGETS,
    ("celery-exporter", "Version"): ALL_TARGETS,
    ("celery-exporter", "Events received by type"): ALL_TARGETS,
    ("celery-exporter", "Event lag p50 / p95 / p99"): ALL_TARGETS,
    ("celery-exporter", "Broker connection"): ALL_TARGETS,
    ("celery-exporter", "Tracked tasks"): ALL_TARGETS,
    ("celery-exporter", "Scrape duration"): ALL_TARGETS,
}


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail(
            "prometheus not found: install Debian's prometheus package "
            "(apt-get install prometheus), which provides /usr/bin/prometheus.",
            pytrace=False,
        )
    return path


def fast_rules(target: Path) -> Path:
    """alerts.yaml with 1 s evaluation and 5 s ``for:``, written to ``target``."""
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "5s"
    target.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    return target


class Prometheus:
    """A Prometheus server on a free port, scraping one exporter every second."""

    def __init__(self, workdir: Path, exporter_port: int) -> None:
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(fast_rules(workdir / "alerts.yaml"))],
            "scrape_configs": [{
                "job_name": JOB,
                "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}],
            }],
        }  # fmt: skip
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [prometheus_binary(), f"--config.file={config_file}",
             f"--web.listen-address={self.url.removeprefix('http://')}",
             f"--storage.tsdb.path={workdir / 'data'}"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_for(self._ready, TIMEOUT, lambda: f"Prometheus not ready:\n{self.log()}")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"Prometheus exited:\n{self.log()}")
        try:
            scrape(self.url, "/-/ready", timeout=1.0)
        except OSError:
            return False
        return True

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """One /api/v1 call; errors (bad query: HTTP 400) come back as their JSON body."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            return json.load(exc)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant vector's samples; fails on anything but success."""
        answer = self.api("query", query=expr)
        assert answer["status"] == "success", f"{expr}\n{answer.get('error')}"
        return answer["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The value of a single-sample query, None while it has no sample."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def alerts(self, name: str, /, **labels: str) -> list[dict[str, Any]]:
        """Active (pending or firing) instances of an alert whose labels include ``labels``."""
        return [
            alert
            for alert in self.api("alerts")["data"]["alerts"]
            if alert["labels"]["alertname"] == name and labels.items() <= alert["labels"].items()
        ]

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


@dataclass
class Live:
    prometheus: Prometheus
    broker_url: str
    worker: str  # the hostname of the worker that ran the tasks


def wait_for_value(prometheus: Prometheus, expr: str, expected: float) -> None:
    """Poll Prometheus until ``expr`` has the single value ``expected``."""
    wait_for(lambda: prometheus.value(expr) == expected, TIMEOUT,
             lambda: f"{expr} did not reach {expected:g} in Prometheus: "
                     f"{prometheus.query(expr)}")  # fmt: skip


def wait_for_alert(prometheus: Prometheus, name: str, /, **labels: str) -> None:
    """Poll Prometheus until the alert is pending or firing for those labels."""
    wait_for(lambda: prometheus.alerts(name, **labels), TIMEOUT,
             lambda: f"{name} {labels} neither pending nor firing; active alerts: "
                     f"{prometheus.api('alerts')['data']['alerts']}")  # fmt: skip


def wait_for_rules(prometheus: Prometheus) -> None:
    """Wait until every rule group has been evaluated on everything scraped so far.

    An evaluation reads the samples scraped before it, and each group runs on
    its own phase of the interval: a panel on one group's recordings can be
    empty a second after another group has caught up.
    """
    now = time.time()

    def stale_groups() -> list[str]:
        groups = prometheus.api("rules")["data"]["groups"]
        return [group["name"] for group in groups
                if datetime.fromisoformat(group["lastEvaluation"]).timestamp() <= now]  # fmt: skip

    wait_for(lambda: not stale_groups(), TIMEOUT,
             lambda: f"rule groups not evaluated since {now}: {stale_groups()}")  # fmt: skip


@pytest.fixture(scope="module", params=["keep", "drop"])
def live(
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    module_worker_factory: WorkerFactory,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Live]:
    """Exporter, worker and Prometheus, after a warm-up and a burst of tasks.

    rate() needs two samples of a series, and a counter's first sample is its
    start: one success and one failure come first, and the burst is sent
    only when Prometheus has scraped both series, so it shows as an increase.
    """
    broker_url = redis_server.url_for(REDIS_DB)  # its own database: its own event channel
    # Every dashboard and rule runs on task series with and without the worker (drop); an
    # objective and an interval for TASK only: FAILING_TASK stays with the plain ratio alert.
    exporter = ExporterProcess(["--broker-url", broker_url, "--worker-timeout", "3",
                                "--queue-poll-interval", "1",
                                "--task-hostname-label", request.param,
                                "--task-objective", f"{TASK}=0.99",
                                "--task-expected-interval", f"{TASK}=3600"])  # fmt: skip
    prometheus = None
    try:
        exporter.wait_serving()
        worker = module_worker_factory(broker_url)
        prometheus = Prometheus(tmp_path_factory.mktemp("prometheus"), exporter.port)
        app = make_app(broker_url, sent_events=True)
        succeeded = f'sum(celery_task_succeeded_total{{job="{JOB}",name="{TASK}"}})'
        failed = f'sum(celery_task_failed_total{{job="{JOB}",name="{FAILING_TASK}"}})'
        app.send_task(TASK, (1, 2))
        app.send_task(FAILING_TASK, ("warm-up",))
        wait_for_value(prometheus, succeeded, 1)
        wait_for_value(prometheus, failed, 1)
        for i in range(FAILURES):
            app.send_task(FAILING_TASK, (f"burst {i}",))
        for i in range(SUCCESSES):
            app.send_task(TASK, (i, i))
        wait_for_value(prometheus, failed, 1 + FAILURES)
        wait_for_value(prometheus, succeeded, 1 + SUCCESSES)
        wait_for_rules(prometheus)
        yield Live(prometheus, broker_url, worker.hostname)
    finally:
        if prometheus is not None:
            prometheus.stop()
        exporter.stop()


def rule_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [
        (rule.get("record") or rule["alert"], rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


def panel_targets(uid: str, title: str) -> list[tuple[str, str]]:
    """(refId, PromQL) of every panel of that title on that dashboard."""
    name = next(name for name, u in DASHBOARDS.items() if u == uid)
    return [
        (target["refId"], target["expr"])
        for panel in all_panels(load(name))
        if panel.get("title") == title
        for target in panel.get("targets", [])
    ]


def has_data(result: list[dict[str, Any]]) -> bool:
    """Grafana draws something: at least one sample that is a number."""
    return any(not math.isnan(float(sample["value"][1])) for sample in result)


# ------------------------------------------------------------------------ tests


def test_every_dashboard_query_and_rule_parses(live: Live) -> None:
    items = [
        (f"{name}: {where}", substitute_variables(expr, VARIABLES))
        for name in DASHBOARDS
        for where, expr in queries(load(name))
    ]
    items += [(f"rule {name}", expr) for name, expr in rule_expressions()]
    errors = [
        f"{where}: {answer.get('error')}\n  {expr}"
        for where, expr in items
        if (answer := live.prometheus.api("query", query=expr))["status"] != "success"
    ]
    assert not errors, "\n".join(errors)


def test_dashboard_variables_have_values(live: Live) -> None:
    empty = [
        f"{name}: {where}: {expr}"
        for name in DASHBOARDS
        for where, expr in queries(load(name))
        if where.startswith("variable")
        and not live.prometheus.query(substitute_variables(expr, VARIABLES))
    ]
    assert not empty, "variables without values:\n" + "\n".join(empty)


@pytest.mark.parametrize(("uid", "title"), CORE_PANELS, ids=[f"{u}:{t}" for u, t in CORE_PANELS])
def test_core_panel_shows_data(live: Live, uid: str, title: str) -> None:
    targets = panel_targets(uid, title)
    assert targets, f"{uid}: no panel titled {title!r} (renamed? update CORE_PANELS)"
    required = CORE_PANELS[uid, title] or tuple(ref for ref, _ in targets)
    empty = [
        f"{ref}: {expr}"
        for ref, expr in targets
        if ref in required
        and not has_data(live.prometheus.query(substitute_variables(expr, VARIABLES)))
    ]
    assert not empty, f"{uid} panel {title!r} shows no data:\n" + "\n".join(empty)


def test_failure_burst_raises_failure_ratio_alert(live: Live) -> None:
    wait_for_alert(live.prometheus, "CeleryTaskFailureRatioHigh", name=FAILING_TASK)
    assert live.prometheus.alerts("CeleryTaskFailureRatioHigh", name=TASK) == []


def test_the_dashboards_work_without_a_broker_label(live: Live) -> None:
    assert live.prometheus.query('celery_exporter_build_info{broker!=""}') == []
    (_, expr), *_ = panel_targets("celery-task", "Succeeded")
    assert 'broker=~"$broker"' in expr
    assert has_data(live.prometheus.query(substitute_variables(expr, VARIABLES)))


def test_exporter_scraped_and_connected(live: Live) -> None:
    assert live.prometheus.value(f'up{{job="{JOB}"}}') == 1
    assert live.prometheus.value(f'celery_exporter_broker_connected{{job="{JOB}"}}') == 1
    assert live.prometheus.alerts("CeleryExporterBrokerDisconnected") == []
    assert live.prometheus.alerts("CeleryExporterDown") == []


def test_killed_worker_raises_worker_down(live: Live, worker_factory: WorkerFactory) -> None:
    worker = worker_factory(live.broker_url, concurrency=1)
    up = f'hostname:celery_worker_up:max{{job="{JOB}",hostname="{worker.hostname}"}}'
    wait_for_value(live.prometheus, up, 1)
    worker.kill()
    wait_for_value(live.prometheus, up, 0)
    wait_for_alert(live.prometheus, "CeleryWorkerDown", hostname=worker.hostname)
    assert live.prometheus.alerts("CeleryWorkerDown", hostname=live.worker) == []
