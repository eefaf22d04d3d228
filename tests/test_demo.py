"""``--demo``: a real worker on a temporary filesystem broker, exported live."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path
from typing import Any

from exporter.telemetry.metrics import FLOWER, METRICS
from tests.harness import ExporterProcess, scrape
from tests.servers import wait_for

# Families a one-worker filesystem cluster cannot show: consumers are reported by
# RabbitMQ only, nothing in the demo passes the label cap, it exports no traces, and
# its worker is never lost, and it sets no objectives or expected intervals. Flower's
# families are off by default.
NOT_IN_DEMO = {
    "celery_queue_consumers",
    "celery_task_objective_ratio",
    "celery_task_expected_interval_seconds",
    "celery_exporter_label_values_folded_total",
    "celery_exporter_spans_total",
    "celery_task_interrupted_total",
}


def _families(exporter: ExporterProcess) -> set[str]:
    names = set()
    for name, _labels in exporter.samples():
        for suffix in ("_bucket", "_count", "_sum"):
            name = name.removesuffix(suffix)
        names.add(name)
    return names


def _overview(exporter: ExporterProcess) -> dict[str, Any]:
    return json.loads(scrape(exporter.url, "/api/v1/overview"))


def _moving(exporter: ExporterProcess) -> bool:
    """The overview has a throughput point with finished tasks, and a failure listed."""
    data = _overview(exporter)
    return bool(sum(data["throughput"]["succeeded"]) and data["recent_failures"]["items"])


def test_the_demo_serves_every_family_within_30_seconds_and_cleans_up() -> None:
    exporter = ExporterProcess(["--demo"])
    started = time.monotonic()
    try:
        exporter.wait_serving()
        wanted = {spec.name for spec in METRICS if not spec.name.startswith(FLOWER)} - NOT_IN_DEMO
        wait_for(
            lambda: wanted <= _families(exporter),
            timeout=30,
            message=lambda: f"missing families: {sorted(wanted - _families(exporter))}",
        )
        assert exporter.sample("celery_exporter_broker_connected") == 1
        invalid = {
            labels: value
            for (name, labels), value in exporter.samples().items()
            if name == "celery_exporter_events_invalid_total" and value
        }
        assert invalid == {}
        # It opens on the live overview, whose charts move within the same 30 s.
        assert f"the live overview: http://localhost:{exporter.port}/" in exporter.log()
        assert 'src="/static/overview.js"' in scrape(exporter.url, "/")
        wait_for(
            lambda: _moving(exporter),
            timeout=max(1.0, 30 - (time.monotonic() - started)),
            message=lambda: str(_overview(exporter)),
        )
    finally:
        assert exporter.stop(signal.SIGINT) == 0
    folder = re.search(r"demo cluster in (\S+)", exporter.log())
    assert folder, exporter.log()
    assert not Path(folder[1]).exists()
    # The demo's output is the exporter's own log lines only: no third-party warning.
    loggers = re.findall(r"^\S+ \S+ [A-Z]+ +(\S+): ", exporter.log(), re.MULTILINE)
    assert len(loggers) == len(exporter.log().splitlines()), exporter.log()
    assert all(name.startswith("exporter.") for name in loggers), exporter.log()
