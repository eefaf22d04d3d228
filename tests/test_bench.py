"""The benchmark runs end to end at a small size, and the exporter loses nothing.

Timing is the benchmark's business, not the suite's: nothing here asserts a
speed, only that the bench works, that every event published at a modest
rate was counted, and that its JSON has the figures dashboards compare.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import LABELS, RABBITMQ_TARGETS, TARGETS

ROOT = Path(__file__).resolve().parent.parent


def test_quick_bench_counts_every_event_and_writes_its_figures(tmp_path: Path) -> None:
    output = tmp_path / "latest.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(output.read_text())

    assert result["mode"] == "quick"
    assert set(result["machine"]) == {"cpu", "cores", "python", "system"}
    assert set(result["figures"]) == set(TARGETS) == set(LABELS)
    for figure in result["figures"].values():
        assert set(figure) >= {"exporter", "baseline", "ratio", "target", "met"}
    assert result["figures"]["metrics_render_ms"]["samples"] > 0

    exporter_runs = [
        r
        for r in result["runs"]
        if r["subject"] == "exporter" and not r["scenario"].startswith("overload")
    ]
    assert {r["scenario"] for r in exporter_runs} >= {
        "cpu 2000/s unbatched",
        "cpu 4000/s batched",
        "sustain 3000/s unbatched",
        "sustain 6000/s batched",
        "memory",
        "metrics grid",
    }
    for r in exporter_runs:
        assert r["published"]["error"] == ""
        assert r["counted"] == r["published"]["events"], r
        assert r["lost"] == 0
    assert {r["subject"] for r in result["runs"]} == {"exporter", "exporter+traces", "baseline"}

    # With traces on, the same traffic ran and its spans reached the sink.
    traced_runs = [r for r in result["runs"] if r["subject"] == "exporter+traces"]
    assert {r["scenario"] for r in traced_runs} == {"cpu 2000/s unbatched", "cpu 4000/s batched"}
    for r in traced_runs:
        assert r["lost"] == 0
    assert result["traces"]["spans"] > 0
    assert result["figures"]["traced_cpu_ratio_batched"]["traced_us_per_event"] > 0

    # A stalled exporter is dropped by Redis once, counts it, says why, and saw the lag.
    overload = result["overload"]
    assert overload["reconnects"] == 1
    assert overload["connected_after"] == 1
    assert overload["cause_logged"]
    assert overload["events_lagging_over_250ms"] > 0
    assert "| figure | exporter | Celery EventReceiver + State |" in run.stdout

    # The same traffic on RabbitMQ, through the AMQP reader: nothing lost either.
    assert set(result["rabbitmq"]["figures"]) == set(RABBITMQ_TARGETS)
    rabbitmq_runs = [r for r in result["runs"] if r["broker"] == "rabbitmq"]
    assert {(r["subject"], r["scenario"]) for r in rabbitmq_runs} >= {
        ("exporter", "cpu 2000/s unbatched"),
        ("exporter", "sustain 6000/s batched"),
        ("baseline", "cpu 4000/s batched"),
    }
    for r in rabbitmq_runs:
        assert r["published"]["error"] == ""
        if r["subject"] == "exporter":
            assert r["counted"] == r["published"]["events"], r
    assert "RabbitMQ:" in run.stdout

    # Where the CPU goes, stage by stage, for each broker and batching.
    assert set(result["split"]) == {
        f"{broker}_{mode}" for broker in ("redis", "rabbitmq") for mode in ("unbatched", "batched")
    }
    for stages in result["split"].values():
        assert set(stages) == {"receive", "decode", "check", "track", "total"}
        assert all(value > 0 for value in stages.values()), stages
        parts = sum(stages[stage] for stage in ("receive", "decode", "check", "track"))
        assert stages["total"] == pytest.approx(parts, abs=0.05)
    assert "| µs an event, in process | receive | decode | check | track | total |" in run.stdout
