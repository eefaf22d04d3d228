"""Checks for the Prometheus rules, their unit tests, the example configs and the runbook.

promtool is required (Debian's ``prometheus`` package ships /usr/bin/promtool);
a missing promtool is a failure, never a skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.tools import promtool

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "config" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yaml"
ALERT_TESTS = PROMETHEUS_DIR / "alerts.test.yaml"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTMANAGER_CONFIG = ROOT / "config" / "alertmanager" / "alertmanager.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_URL = (
    "https://github.com/celery-events-exporter/celery-events-exporter/blob/main/docs/runbook.md#"
)
SEVERITIES = {"warning", "critical", "page", "ticket"}
"""warning and critical; the error-budget alerts page and ticket, as SRE practice names them."""

# The alerts and recording rules are a contract with the Helm chart, the
# dashboards and the live test: renaming one must be a deliberate change here.
EXPECTED_ALERTS = {
    "CeleryWorkerDown",
    "CeleryTaskFailureRatioHigh",
    "CeleryQueueBacklogGrowing",
    "CeleryTaskRuntimeHigh",
    "CeleryTaskQueueWaitHigh",
    "CeleryExporterDown",
    "CeleryExporterNoEvents",
    "CeleryExporterBrokerDisconnected",
    "CeleryExporterEventsInvalid",
    "CeleryTaskStuck",
    "CeleryTasksInterrupted",
    "CeleryExporterEventsMissed",
    "CeleryQueueNoWorkers",
    "CeleryWorkersSaturated",
    "CeleryTaskErrorBudgetBurnFast",
    "CeleryTaskErrorBudgetBurnSlow",
    "CeleryTaskNotSucceededRecently",
}
EXPECTED_RECORDING_RULES = {
    "name_queue:celery_task_sent:rate5m",
    "name_queue:celery_task_received:rate5m",
    "name_queue:celery_task_started:rate5m",
    "name_queue:celery_task_succeeded:rate5m",
    "name_queue:celery_task_failed:rate5m",
    "name_queue:celery_task_retried:rate5m",
    "name_queue:celery_task_rejected:rate5m",
    "name_queue:celery_task_revoked:rate5m",
    "name_exception:celery_task_failed:rate5m",
    "name:celery_task_succeeded:rate5m",
    "name:celery_task_failed:rate5m",
    "name:celery_task_failure:ratio_rate5m",
    "name_queue_le:celery_task_runtime_seconds_bucket:rate5m",
    "name_queue:celery_task_runtime_seconds:p95_5m",
    "name_queue_le:celery_task_queue_wait_seconds_bucket:rate5m",
    "name_queue:celery_task_queue_wait_seconds:p95_5m",
    "name_queue_le:celery_task_prefetch_wait_seconds_bucket:rate5m",
    "name_queue:celery_task_prefetch_wait_seconds:p95_5m",
    "name_queue:celery_task_running:max",
    "name_queue:celery_task_oldest_running_age:seconds",
    "hostname:celery_worker_up:max",
    "queue:celery_queue_length:max",
    "hostname:celery_worker_pool_size:max",
    "hostname:celery_worker_tasks_active:max",
    "hostname:celery_worker_utilisation:ratio",
    "job:celery_worker_utilisation:ratio",
    "queue:celery_worker_pool_size:sum",
    "queue:celery_worker_tasks_active:sum",
    "queue:celery_worker_utilisation:ratio",
    "queue:celery_queue_workers:max",
    "name:celery_task_error_budget:ratio",
    "name:celery_task_failed:rate30m",
    "name:celery_task_succeeded:rate30m",
    "name:celery_task_failure:ratio_rate30m",
    "name:celery_task_failed:rate1h",
    "name:celery_task_succeeded:rate1h",
    "name:celery_task_failure:ratio_rate1h",
    "name:celery_task_failed:rate2h",
    "name:celery_task_succeeded:rate2h",
    "name:celery_task_failure:ratio_rate2h",
    "name:celery_task_failed:rate6h",
    "name:celery_task_succeeded:rate6h",
    "name:celery_task_failure:ratio_rate6h",
    "name:celery_task_failed:rate1d",
    "name:celery_task_succeeded:rate1d",
    "name:celery_task_failure:ratio_rate1d",
    "name:celery_task_failed:rate3d",
    "name:celery_task_succeeded:rate3d",
    "name:celery_task_failure:ratio_rate3d",
    "name:celery_task_expected_interval:seconds",
    "name:celery_task_last_succeeded:timestamp_seconds",
}


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [promtool(), *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, (
        f"promtool {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return result


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def rules(kind: str) -> list[dict[str, Any]]:
    """All rules of ``kind`` ("alert" or "record") in alerts.yaml."""
    return [
        rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"] if kind in rule
    ]


def alerts() -> list[dict[str, Any]]:
    return rules("alert")


def alert_names() -> set[str]:
    return {rule["alert"] for rule in alerts()}


def recording_rule_names() -> set[str]:
    return {rule["record"] for rule in rules("record")}


def github_anchor(heading: str) -> str:
    """The anchor GitHub generates for a Markdown heading."""
    anchor = heading.strip().lower()
    anchor = re.sub(r"[^\w\- ]", "", anchor)
    return anchor.replace(" ", "-")


def runbook_anchors() -> set[str]:
    text = RUNBOOK.read_text(encoding="utf-8")
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


# --------------------------------------------------------------------- promtool


def test_promtool_check_rules() -> None:
    run_promtool("check", "rules", str(ALERTS.relative_to(ROOT)))


def test_promtool_test_rules() -> None:
    result = run_promtool("test", "rules", str(ALERT_TESTS.relative_to(ROOT)))
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_check_config() -> None:
    run_promtool("check", "config", str(PROMETHEUS_CONFIG.relative_to(ROOT)))


# ----------------------------------------------------------------- rule content


def test_alert_and_recording_rule_names_are_the_contract() -> None:
    assert alert_names() == EXPECTED_ALERTS
    assert recording_rule_names() == EXPECTED_RECORDING_RULES
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names)), "duplicate alert names"


def test_recording_rule_names_follow_level_metric_operations() -> None:
    for name in recording_rule_names():
        assert re.fullmatch(r"[a-z_]+:celery_[a-z_]+:[a-z0-9_]+", name), name


@pytest.mark.parametrize("alert", alerts(), ids=lambda rule: rule["alert"])
def test_alert_metadata(alert: dict[str, Any]) -> None:
    name = alert["alert"]
    assert alert.get("for"), f"{name}: no `for:`"
    assert alert.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity"
    annotations = alert.get("annotations", {})
    assert annotations.get("summary", "").strip(), f"{name}: no summary"
    description = annotations.get("description", "")
    assert description.strip(), f"{name}: no description"
    assert "{{" in description, f"{name}: description is not templated"
    url = annotations.get("runbook_url", "")
    assert url == RUNBOOK_URL + name.lower(), f"{name}: runbook_url {url!r}"
    anchor = url.rsplit("#", 1)[1]
    assert anchor in runbook_anchors(), f"{name}: no heading `## {name}` in {RUNBOOK}"


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    spec = load_yaml(ALERT_TESTS)
    assert [Path(f).name for f in spec["rule_files"]] == [ALERTS.name]
    firing: set[str] = set()
    quiet: set[str] = set()
    for group in spec["tests"]:
        for case in group.get("alert_rule_test", []):
            expected = case.get("exp_alerts") or []
            if expected:
                firing.add(case["alertname"])
                for exp in expected:
                    assert exp["exp_labels"]["severity"] in SEVERITIES
            else:
                quiet.add(case["alertname"])
    assert alert_names() - firing == set(), "alerts without a firing test case"
    assert alert_names() - quiet == set(), "alerts without a non-firing test case"
    assert (firing | quiet) - alert_names() == set(), "tests for unknown alerts"


# ------------------------------------------------------------- example configs


def test_prometheus_config_loads_the_rules_and_scrapes_the_exporter() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["rule_files"] == ["alerts.yaml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for sc in jobs["celery-events-exporter"]["static_configs"] for t in sc["targets"]]
    assert "localhost:9808" in targets
    am_targets = [
        t
        for am in config["alerting"]["alertmanagers"]
        for sc in am["static_configs"]
        for t in sc["targets"]
    ]
    assert "localhost:9093" in am_targets
    # CeleryExporterDown selects the scrape job by regex: the example must match it.
    down = next(rule for rule in alerts() if rule["alert"] == "CeleryExporterDown")
    regex = re.search(r'job=~"([^"]+)"', down["expr"]).group(1)
    assert re.fullmatch(regex, "celery-events-exporter")


def test_alertmanager_config_routes_by_severity() -> None:
    config = load_yaml(ALERTMANAGER_CONFIG)
    receivers = {r["name"]: r for r in config["receivers"]}
    route = config["route"]
    assert route["receiver"] in receivers
    assert {"alertname", "queue", "name"} <= set(route["group_by"])
    by_severity = {}
    for child in route["routes"]:
        assert child["receiver"] in receivers
        for matcher in child.get("matchers", []):
            m = re.fullmatch(r'severity\s*=\s*"?(\w+)"?', matcher)
            if m:
                by_severity[m.group(1)] = child["receiver"]
    assert set(by_severity) == SEVERITIES
    assert "pagerduty_configs" in receivers[by_severity["critical"]]
    assert {"slack_configs", "email_configs"} & set(receivers[by_severity["warning"]])
    amtool = shutil.which("amtool")
    if amtool:  # optional: the structural checks above run without it
        result = subprocess.run(
            [amtool, "check-config", str(ALERTMANAGER_CONFIG)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
