"""``--demo``: a real worker on a temporary filesystem broker, exported live."""

from __future__ import annotations

import re
import signal
from pathlib import Path

from exporter.metrics import METRICS
from tests.harness import ExporterProcess
from tests.servers import wait_for

# Families a one-worker filesystem cluster cannot show: consumers are reported by
# RabbitMQ only, nothing in the demo passes the label cap, and it exports no traces.
NOT_IN_DEMO = {
    "celery_queue_consumers",
    "celery_exporter_label_values_folded_total",
    "celery_exporter_spans_total",
}


def _families(exporter: ExporterProcess) -> set[str]:
    names = set()
    for name, _labels in exporter.samples():
        for suffix in ("_bucket", "_count", "_sum"):
            name = name.removesuffix(suffix)
        names.add(name)
    return names


def test_the_demo_serves_every_family_within_30_seconds_and_cleans_up() -> None:
    exporter = ExporterProcess(["--demo"])
    try:
        exporter.wait_serving()
        wanted = {spec.name for spec in METRICS} - NOT_IN_DEMO
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
    finally:
        assert exporter.stop(signal.SIGINT) == 0
    folder = re.search(r"demo cluster in (\S+)", exporter.log())
    assert folder, exporter.log()
    assert not Path(folder[1]).exists()
