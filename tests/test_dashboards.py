"""Structural checks for the Grafana dashboards in grafana/dashboards/.

Every query must reference only exported metrics (or recording rules from
config/prometheus/alerts.yaml) and must parse as PromQL (checked with
``promtool check rules`` on a generated rules file).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.tools import promtool

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_DIR = ROOT / "grafana" / "dashboards"
ALERTS = ROOT / "config" / "prometheus" / "alerts.yaml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# file name -> stable uid (links and provisioning depend on these)
DASHBOARDS = {
    "celery-overview.json": "celery-overview",
    "celery-task.json": "celery-task",
    "celery-exporter.json": "celery-exporter",
    "celery-capacity.json": "celery-capacity",
}
REQUIRED_VARIABLES = {
    "celery-overview": {"datasource", "job", "queue", "hostname"},
    "celery-task": {"datasource", "job", "task", "queue", "hostname"},
    "celery-exporter": {"datasource", "job"},
    "celery-capacity": {"datasource", "job", "queue", "hostname"},
}

# The metric contract, as a literal for now: exported_metric_names() prefers
# the daemon's own table (exporter.telemetry.metrics.METRICS) when it exists; this list
# is the fallback and will be removed once the daemon's table is the only source.
EXPORTED_METRICS: dict[str, str] = {
    "celery_task_sent_total": "counter",
    "celery_task_received_total": "counter",
    "celery_task_started_total": "counter",
    "celery_task_succeeded_total": "counter",
    "celery_task_failed_total": "counter",
    "celery_task_retried_total": "counter",
    "celery_task_rejected_total": "counter",
    "celery_task_revoked_total": "counter",
    "celery_task_runtime_seconds": "histogram",
    "celery_task_prefetch_wait_seconds": "histogram",
    "celery_task_queue_wait_seconds": "histogram",
    "celery_exporter_event_lag_seconds": "histogram",
    "celery_worker_up": "gauge",
    "celery_worker_last_heartbeat_timestamp_seconds": "gauge",
    "celery_worker_tasks_active": "gauge",
    "celery_worker_tasks_prefetched": "gauge",
    "celery_worker_tasks_processed_total": "counter",
    "celery_worker_info": "gauge",
    "celery_queue_length": "gauge",
    "celery_queue_consumers": "gauge",
    "celery_exporter_queue_probe_errors_total": "counter",
    "celery_exporter_queue_probe_duration_seconds": "histogram",
    "celery_exporter_events_total": "counter",
    "celery_exporter_events_invalid_total": "counter",
    "celery_exporter_broker_reconnects_total": "counter",
    "celery_exporter_tracked_tasks_evicted_total": "counter",
    "celery_exporter_label_values_folded_total": "counter",
    "celery_exporter_broker_connected": "gauge",
    "celery_exporter_tracked_tasks": "gauge",
    "celery_exporter_build_info": "gauge",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Grafana's built-in variables, replaced by concrete values before parsing;
# any other variable is replaced by ".*" (they only appear inside matchers).
BUILTIN_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__interval_ms": "60000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}
VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")
IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
LABEL_VALUES = re.compile(r"^\s*label_values\((.*?)(?:,\s*\w+\s*)?\)\s*$", re.S)


def exported_metrics() -> dict[str, str]:
    """Exported metric families, name -> kind.

    Uses the daemon's table ``exporter.telemetry.metrics.METRICS`` (objects with
    ``.name`` and ``.kind``; counters' names end in ``_total``) if that module
    exists and has it, else the literal EXPORTED_METRICS above.
    """
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        spec = importlib.util.find_spec("exporter.telemetry.metrics")
    except ModuleNotFoundError:
        spec = None
    if spec is not None:
        module = importlib.import_module("exporter.telemetry.metrics")
        table = getattr(module, "METRICS", None)
        if table:
            return {m.name: m.kind for m in table}
    return dict(EXPORTED_METRICS)


def exported_metric_names() -> set[str]:
    return set(exported_metrics())


def recording_rule_names() -> set[str]:
    with ALERTS.open(encoding="utf-8") as f:
        groups = yaml.safe_load(f)["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def load(name: str) -> dict[str, Any]:
    with (DASHBOARD_DIR / name).open(encoding="utf-8") as f:
        return json.load(f)


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield (
                    f"panel {panel['id']} {panel.get('title')!r} {target.get('refId')}",
                    target["expr"],
                )
    for var in dashboard["templating"]["list"]:
        if var.get("type") != "query":
            continue
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        match = LABEL_VALUES.match(query or "")
        expr = match.group(1) if match else query
        if expr and expr.strip():
            yield f"variable {var['name']}", expr


def all_queries() -> list[tuple[str, str]]:
    return [
        (f"{name}: {where}", expr) for name in DASHBOARDS for where, expr in queries(load(name))
    ]


def substitute_variables(expr: str, values: dict[str, str] | None = None) -> str:
    """Grafana variables replaced: ``values`` first, then the built-ins, else ".*"."""
    known = {**BUILTIN_VARIABLES, **(values or {})}

    def repl(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        return known.get(name, ".*")

    return VARIABLE.sub(repl, expr)


def referenced_names(expr: str) -> set[str]:
    """Metric and recording-rule names in a PromQL expression (roughly)."""
    without_strings = STRING.sub('""', expr)
    return {name for name in IDENTIFIER.findall(without_strings) if "celery_" in name}


def base_metric(name: str, kinds: dict[str, str]) -> str:
    if name in kinds:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and kinds.get(name.removesuffix(suffix)) == "histogram":
            return name.removesuffix(suffix)
    return name


# ------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", DASHBOARDS)
def test_dashboard_identity(name: str) -> None:
    dashboard = load(name)
    assert dashboard["uid"] == DASHBOARDS[name]
    assert "celery" in dashboard["tags"]
    assert dashboard["title"]
    assert dashboard.get("id") is None, "exported with a database id"
    assert "__inputs" not in dashboard, "must import as is, without __inputs"
    assert 36 <= dashboard["schemaVersion"] <= 41


def test_uids_are_unique() -> None:
    uids = [load(name)["uid"] for name in DASHBOARDS]
    assert len(uids) == len(set(uids))


@pytest.mark.parametrize("name", DASHBOARDS)
def test_panel_ids_unique(name: str) -> None:
    ids = [panel["id"] for panel in all_panels(load(name))]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def overlaps(a: dict[str, int], b: dict[str, int]) -> bool:
    return (
        a["x"] < b["x"] + b["w"]
        and b["x"] < a["x"] + a["w"]
        and a["y"] < b["y"] + b["h"]
        and b["y"] < a["y"] + a["h"]
    )


@pytest.mark.parametrize("name", DASHBOARDS)
def test_grid_positions_do_not_overlap(name: str) -> None:
    dashboard = load(name)
    # Panels in a collapsed row are laid out as if it were open: check them
    # among themselves, and the top level separately.
    layers = [dashboard["panels"]]
    layers += [p["panels"] for p in dashboard["panels"] if p.get("collapsed") and p.get("panels")]
    for layer in layers:
        for panel in layer:
            pos = panel["gridPos"]
            assert pos["w"] > 0 and pos["h"] > 0, panel["title"]
            assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
            assert pos["y"] >= 0, panel["title"]
        for i, a in enumerate(layer):
            for b in layer[i + 1 :]:
                assert not overlaps(a["gridPos"], b["gridPos"]), (a["title"], b["title"])


@pytest.mark.parametrize("name", DASHBOARDS)
def test_datasources_are_the_variable(name: str) -> None:
    dashboard = load(name)
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            assert not panel.get("targets"), panel["title"]
            continue
        assert panel.get("datasource") == DATASOURCE, panel["title"]
        assert panel.get("targets"), f"{panel['title']}: no queries"
        for target in panel["targets"]:
            assert target.get("datasource") == DATASOURCE, (panel["title"], target.get("refId"))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            assert var.get("datasource") == DATASOURCE, var["name"]


@pytest.mark.parametrize("name", DASHBOARDS)
def test_template_variables(name: str) -> None:
    dashboard = load(name)
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert REQUIRED_VARIABLES[DASHBOARDS[name]] <= set(variables)
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for var in variables.values():
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            assert query.startswith("label_values("), var["name"]


@pytest.mark.parametrize("name", DASHBOARDS)
def test_panels_have_units_and_titles(name: str) -> None:
    for panel in all_panels(load(name)):
        assert panel.get("title"), panel["id"]
        if panel["type"] in {"timeseries", "stat"}:
            assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]
            assert panel["fieldConfig"]["defaults"].get("thresholds"), panel["title"]
        if panel["type"] == "heatmap":
            assert panel["options"]["yAxis"].get("unit"), panel["title"]
            assert all(t.get("format") == "heatmap" for t in panel["targets"]), panel["title"]
            assert all("_bucket" in t["expr"] for t in panel["targets"]), panel["title"]


def test_exported_metric_names_helper() -> None:
    names = exported_metric_names()
    assert "celery_task_succeeded_total" in names
    assert "celery_worker_up" in names


def test_queries_reference_only_exported_metrics_and_recording_rules() -> None:
    kinds = exported_metrics()
    records = recording_rule_names()
    unknown = []
    for where, expr in all_queries():
        for name in referenced_names(expr):
            if ":" in name:
                if name not in records:
                    unknown.append((where, name, "no such recording rule in alerts.yaml"))
            elif base_metric(name, kinds) not in kinds:
                unknown.append((where, name, "not an exported metric"))
    assert not unknown, "\n".join(map(str, unknown))


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """Each query, variables substituted, as a recording rule for promtool."""
    items = all_queries()
    assert items
    groups = [
        {
            "name": f"q{i:03d} {where}",
            "rules": [{"record": "dashboard_query", "expr": substitute_variables(expr)}],
        }
        for i, (where, expr) in enumerate(items)
    ]
    rules_file = tmp_path / "dashboard-queries.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False), encoding="utf-8")
    result = subprocess.run(
        [promtool(), "check", "rules", str(rules_file)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_variable_substitution() -> None:
    assert substitute_variables('rate(x{a=~"$job"}[$__rate_interval])') == 'rate(x{a=~".*"}[1m])'
    assert substitute_variables('x{q=~"${queue:regex}"}[$__range]') == 'x{q=~".*"}[1h]'
    assert referenced_names('sum(a:celery_x:rate5m{q="celery_y"}) + celery_z_bucket') == {
        "a:celery_x:rate5m",
        "celery_z_bucket",
    }


@pytest.mark.parametrize("name", DASHBOARDS)
def test_every_selector_of_a_job_selects_the_broker_too(name: str) -> None:
    """One release may run an exporter per broker (``broker`` static label); a release of
    one has no such label, which ``broker=~".*"`` (All) matches too."""
    dashboard = load(name)
    broker = next(var for var in dashboard["templating"]["list"] if var["name"] == "broker")
    assert broker["query"]["query"] == "label_values(celery_exporter_build_info, broker)"
    assert (broker["multi"], broker["includeAll"], broker["allValue"]) == (True, True, ".*")
    for where, expr in queries(dashboard):
        assert expr.count('job=~"$job"') == expr.count('job=~"$job",broker=~"$broker"'), where
        assert "by (job," not in expr.replace("by (job, broker", ""), where
