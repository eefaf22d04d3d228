"""The benchmark: the exporter against Celery's ``EventReceiver`` + ``State``.

Starts a private Redis (and a private RabbitMQ node), runs the exporter
(``python -m exporter``) and the baseline (``bench.baseline``) as processes
of their own, drives them with ``bench.publisher`` and measures them from ``/proc``:

* CPU per event: utime + stime over the traffic window, divided by events;
* the highest rate sustained for the window with zero loss (events counted
  by the subject == events published), climbing a ladder of rates;
* resident memory (VmRSS) with 100k unfinished tasks from 1,000 workers;
* ``/metrics`` render time with a series for every worker x task name;
* CPU per event with ``--otlp-traces`` on, posting to ``bench.sink``, over
  the same traffic, as a ratio to the untraced run (the traffic has no
  ``task-sent``, so spans start at ``task-received``);
* where an event's CPU goes, stage by stage, in this process (``bench.split``).

On RabbitMQ (``--broker rabbitmq``, or ``all``) the CPU per event and the
zero-loss ladder are measured the same way, against the RabbitMQ targets.

Prints one table per broker and writes them, with the raw runs, as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tests.harness import ExporterProcess, parse, scrape
from tests.servers import RabbitMQServer, RedisServer, wait_for

from . import split
from .sink import TraceSink

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "latest.json"
TICKS = os.sysconf("SC_CLK_TCK")
PUBSUB_BUFFER_LIMIT = "pubsub 33554432 8388608 60"
"""Redis' default: a subscriber 32 MB behind, or 8 MB for a minute, is disconnected."""
TRACE_BATCH_DELAY_MS = "200"
"""OTEL_BSP_SCHEDULE_DELAY: the last partial batch is exported within the CPU window."""


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is; ``QUICK`` only proves the bench works."""

    cpu_rate_unbatched: float
    cpu_rate_batched: float
    cpu_seconds: float
    cpu_windows: int
    window: float
    ladder_unbatched: tuple[float, ...]
    ladder_batched: tuple[float, ...]
    baseline_ladder: tuple[float, ...]
    memory_tasks: int
    memory_workers: int
    memory_rate: float
    grid_workers: int
    grid_names: int
    scrapes: int
    overload_rate: float


FULL = Sizes(
    cpu_rate_unbatched=60_000,
    cpu_rate_batched=200_000,
    cpu_seconds=2,
    cpu_windows=3,
    window=10,
    ladder_unbatched=(40_000, 60_000, 80_000, 100_000, 120_000),
    ladder_batched=(100_000, 200_000, 300_000, 400_000),
    baseline_ladder=(5_000, 10_000, 15_000, 20_000, 30_000),
    memory_tasks=100_000,
    memory_workers=1000,
    memory_rate=10_000,
    grid_workers=200,
    grid_names=50,
    scrapes=31,
    overload_rate=150_000,
)
QUICK = Sizes(
    cpu_rate_unbatched=2_000,
    cpu_rate_batched=4_000,
    cpu_seconds=1,
    cpu_windows=1,
    window=1,
    ladder_unbatched=(3_000,),
    ladder_batched=(6_000,),
    baseline_ladder=(2_000,),
    memory_tasks=2_000,
    memory_workers=20,
    memory_rate=5_000,
    grid_workers=10,
    grid_names=5,
    scrapes=5,
    overload_rate=20_000,
)

RABBITMQ_FULL = dataclasses.replace(
    FULL,
    cpu_rate_unbatched=40_000,
    ladder_unbatched=(20_000, 40_000, 60_000, 80_000),
    ladder_batched=(100_000, 200_000, 300_000),
)

TARGETS = {  # figure: (bound, "max" when the figure must stay below it, else "min")
    "cpu_us_per_event_unbatched": (10.0, "max"),
    "cpu_us_per_event_batched": (4.0, "max"),
    "zero_loss_rate_unbatched": (60_000, "min"),
    "zero_loss_rate_batched": (200_000, "min"),
    "rss_mb_100k_tasks": (150.0, "max"),
    "metrics_render_ms": (100.0, "max"),
    "traced_cpu_ratio_unbatched": (2.0, "max"),
    "traced_cpu_ratio_batched": (2.0, "max"),
}
RABBITMQ_TARGETS = {
    "cpu_us_per_event_unbatched": (12.0, "max"),
    "cpu_us_per_event_batched": (5.0, "max"),
    "zero_loss_rate_unbatched": (40_000, "min"),
    "zero_loss_rate_batched": (200_000, "min"),
}
RABBITMQ_CPU_RATIO = 0.125
"""On RabbitMQ the exporter's CPU per event must also be at most this share of the baseline's."""
LABELS = {
    "cpu_us_per_event_unbatched": "CPU per event, unbatched (µs)",
    "cpu_us_per_event_batched": "CPU per event, batched (µs)",
    "zero_loss_rate_unbatched": "zero-loss rate for the window, unbatched (events/s)",
    "zero_loss_rate_batched": "zero-loss rate for the window, batched (events/s)",
    "rss_mb_100k_tasks": "resident memory, 100k tasks + 1,000 workers (MB)",
    "metrics_render_ms": "/metrics render, 200 workers x 50 names (ms, median)",
    "traced_cpu_ratio_unbatched": "CPU per event, traces on / off, unbatched (x)",
    "traced_cpu_ratio_batched": "CPU per event, traces on / off, batched (x)",
}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def settled_cpu_seconds(pid: int, quiet: float = 0.3) -> float:
    """CPU seconds once the process has caught up: none used for ``quiet`` seconds.

    Waiting this way rather than by scraping keeps the scrapes' own cost (tens
    of milliseconds with thousands of series) out of the CPU per event.
    """
    used, still_since = cpu_seconds(pid), time.monotonic()
    while time.monotonic() - still_since < quiet:
        time.sleep(0.05)
        now = cpu_seconds(pid)
        if now != used:
            used, still_since = now, time.monotonic()
    return used


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class Exporter:
    """The daemon under test, counted through its own /metrics.

    With ``traces`` (an OTLP/HTTP endpoint) it runs with ``--otlp-traces``.
    """

    def __init__(self, broker_url: str, traces: str | None = None) -> None:
        self.name = "exporter+traces" if traces else "exporter"
        tracing = ["--otlp-traces"] if traces else []
        env = (
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": traces,
                "OTEL_BSP_SCHEDULE_DELAY": TRACE_BATCH_DELAY_MS,
            }
            if traces
            else None
        )
        self.process = ExporterProcess(
            ["--broker-url", broker_url, "--log-level", "warning", *tracing], env=env
        )
        self.process.wait_serving()
        self.pid = self.process.process.pid
        deadline = time.monotonic() + 15
        while not _ready(self.process.url) and time.monotonic() < deadline:
            time.sleep(0.05)

    def events(self) -> int:
        return int(
            sum(
                float(line.rpartition(" ")[2])
                for line in scrape(self.process.url).splitlines()
                if line.startswith("celery_exporter_events_total{")
            )
        )

    def stop(self) -> None:
        self.process.stop()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=1):
            return True
    except OSError:
        return False


class Baseline:
    """Celery's EventReceiver + State in a process of its own."""

    name = "baseline"

    def __init__(self, broker_url: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.baseline", "--broker-url", broker_url],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.process.pid

    def events(self) -> int:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


class _Broker:
    """A private broker server the subjects and the publisher connect to."""

    kind = ""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.url, self.port = server.url, server.port

    def close(self) -> None:
        self.server.close()


class RedisBroker(_Broker):
    """A private Redis; subjects psubscribe to the event channels."""

    kind = "redis"

    def wait_subscribed(self) -> None:
        with self.server.client() as client:
            wait_for(lambda: client.pubsub_numpat() >= 1, 30, "subject never subscribed")

    @contextlib.contextmanager
    def unbounded(self) -> Iterator[None]:
        """Redis' output-buffer limit lifted: a slow subject works through a backlog."""
        client = self.server.client()
        client.config_set("client-output-buffer-limit", "pubsub 0 0 0")
        try:
            yield
        finally:
            client.config_set("client-output-buffer-limit", PUBSUB_BUFFER_LIMIT)
            client.close()


class RabbitMQBroker(_Broker):
    """A private RabbitMQ node; subjects consume from a queue bound to the event exchange."""

    kind = "rabbitmq"

    def wait_subscribed(self) -> None:
        wait_for(self._consumed, 60, "subject never consumed from an event queue", interval=0.2)

    def _consumed(self) -> bool:
        out = self.server.ctl("list_queues", "-q", "--formatter", "json", "name", "consumers")
        return any(
            row["name"].startswith("celeryev") and row["consumers"]
            for row in json.loads(out or "[]")
        )

    @contextlib.contextmanager
    def unbounded(self) -> Iterator[None]:
        """Nothing to lift: what a slow subject leaves queued expires after the queue's TTL."""
        yield


Broker = RedisBroker | RabbitMQBroker
Subject = Exporter | Baseline
Start = Callable[[str], Subject]
"""A subject's class, or any callable making one from the broker URL."""


class Bench:
    def __init__(self, sizes: Sizes, broker: Broker, runs: list[dict[str, Any]]) -> None:
        self.sizes = sizes
        self.broker = broker
        self.runs = runs

    def start(self, kind: Start) -> Subject:
        subject = kind(self.broker.url)
        try:
            self.broker.wait_subscribed()
        except BaseException:
            subject.stop()
            raise
        return subject

    def traffic(
        self, subject: Subject, scenario: str, *publisher_args: str, stall: bool = False
    ) -> dict[str, Any]:
        """Publish, wait until the subject has counted everything it will, measure.

        With ``stall`` the subject is stopped (SIGSTOP) while the traffic passes.
        """
        before_events, before_cpu = subject.events(), cpu_seconds(subject.pid)
        if stall:
            os.kill(subject.pid, signal.SIGSTOP)
        try:
            publisher = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.publisher",
                    "--port",
                    str(self.broker.port),
                    "--broker",
                    self.broker.kind,
                    *publisher_args,
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
        finally:
            if stall:
                os.kill(subject.pid, signal.SIGCONT)
        if publisher.returncode:
            raise RuntimeError(f"the publisher failed:\n{publisher.stderr[-3000:]}")
        published = json.loads(publisher.stdout)
        expected = before_events + published["events"]
        cpu = settled_cpu_seconds(subject.pid) - before_cpu
        counted, last_change = subject.events(), time.monotonic()
        while counted < expected and time.monotonic() - last_change < 3.0:
            time.sleep(0.05)
            now = subject.events()
            if now != counted:
                counted, last_change = now, time.monotonic()
        run = {
            "broker": self.broker.kind,
            "subject": subject.name,
            "scenario": scenario,
            "published": published,
            "counted": counted - before_events,
            "lost": expected - counted,
            "cpu_seconds": round(cpu, 3),
            "cpu_us_per_event": round(cpu / max(1, counted - before_events) * 1e6, 2),
            "rss_mb": round(rss_mb(subject.pid), 1),
        }
        self.runs.append(run)
        print(
            f"  {self.broker.kind:8} {subject.name:8} {scenario:34} "
            f"published {published['events']:>8} "
            f"at {published['rate'] or 0:>9.0f}/s  lost {run['lost']:>7}  "
            f"{run['cpu_us_per_event']:>6} µs/event",
            file=sys.stderr,
        )
        return run

    def cpu(self, kind: Start, batched: bool) -> float:
        """CPU per event over the same traffic for both subjects, at the target rate:
        the median of ``cpu_windows`` windows, the machine being shared.

        Redis' output-buffer limit is lifted meanwhile, so a subject slower than
        the traffic works through the backlog instead of being disconnected.
        """
        rate = self.sizes.cpu_rate_batched if batched else self.sizes.cpu_rate_unbatched
        subject = self.start(kind)
        scenario = f"cpu {rate:.0f}/s {'batched' if batched else 'unbatched'}"
        try:
            with self.broker.unbounded():
                per_event = [
                    self.traffic(
                        subject,
                        scenario,
                        "--rate",
                        str(rate),
                        "--seconds",
                        str(self.sizes.cpu_seconds),
                        *(("--batched",) if batched else ()),
                    )["cpu_us_per_event"]
                    for _ in range(self.sizes.cpu_windows)
                ]
        finally:
            subject.stop()
        return statistics.median(per_event)

    def cpu_figures(self) -> dict[str, tuple[float, float]]:
        """CPU per event of the exporter and the baseline, unbatched and batched."""
        return {
            "cpu_us_per_event_unbatched": (self.cpu(Exporter, False), self.cpu(Baseline, False)),
            "cpu_us_per_event_batched": (self.cpu(Exporter, True), self.cpu(Baseline, True)),
        }

    def ladders(self) -> dict[str, tuple[float, float]]:
        """The zero-loss rate of the exporter and the baseline, unbatched and batched."""
        sizes = self.sizes
        return {
            "zero_loss_rate_unbatched": (
                self.zero_loss(Exporter, sizes.ladder_unbatched, False),
                self.zero_loss(Baseline, sizes.baseline_ladder, False),
            ),
            "zero_loss_rate_batched": (
                self.zero_loss(Exporter, sizes.ladder_batched, True),
                self.zero_loss(Baseline, sizes.baseline_ladder, True),
            ),
        }

    def zero_loss(self, kind: Start, ladder: tuple[float, ...], batched: bool) -> float:
        """The highest rate of the ladder sustained with zero loss (0: none)."""
        subject, best = self.start(kind), 0.0
        try:
            for rate in ladder:
                run = self.traffic(
                    subject,
                    f"sustain {rate:.0f}/s {'batched' if batched else 'unbatched'}",
                    "--rate",
                    str(rate),
                    "--seconds",
                    str(self.sizes.window),
                    *(("--batched",) if batched else ()),
                )
                if run["lost"] or run["published"]["rate"] < 0.97 * rate:
                    break
                best = rate
        finally:
            subject.stop()
        return best

    def memory(self, kind: Start) -> float:
        subject = self.start(kind)
        try:
            run = self.traffic(
                subject,
                "memory",
                "--mode",
                "received",
                "--tasks",
                str(self.sizes.memory_tasks),
                "--workers",
                str(self.sizes.memory_workers),
                "--names",
                "100",
                "--rate",
                str(self.sizes.memory_rate),
            )
        finally:
            subject.stop()
        return run["rss_mb"]

    def render(self) -> tuple[float, int]:
        """Median /metrics time (ms) over a series for every worker x name, and samples."""
        subject = self.start(Exporter)
        assert isinstance(subject, Exporter)
        try:
            self.traffic(
                subject,
                "metrics grid",
                "--mode",
                "grid",
                "--workers",
                str(self.sizes.grid_workers),
                "--names",
                str(self.sizes.grid_names),
                "--rate",
                "20000",
            )
            times, text = [], ""
            for _ in range(self.sizes.scrapes):
                began = time.perf_counter()
                text = scrape(subject.process.url)
                times.append((time.perf_counter() - began) * 1000)
        finally:
            subject.stop()
        samples = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
        return statistics.median(times), samples

    def overload(self, stall: bool) -> dict[str, Any]:
        """Traffic far above capacity: Redis must drop the exporter, and the exporter say why.

        ``stall`` stops the exporter (SIGSTOP) while the traffic passes instead,
        which reaches the same disconnect in less traffic (the quick run).
        """
        subject = self.start(Exporter)
        assert isinstance(subject, Exporter) and isinstance(self.broker, RedisBroker)
        client = self.broker.server.client()
        limit = "pubsub 262144 0 0" if stall else PUBSUB_BUFFER_LIMIT
        client.config_set("client-output-buffer-limit", limit)
        rate, seconds = (20_000, 1) if stall else (self.sizes.overload_rate, 4)
        try:
            self.traffic(
                subject,
                f"overload {rate:.0f}/s{' stalled' if stall else ''}",
                "--rate",
                str(rate),
                "--seconds",
                str(seconds),
                stall=stall,
            )
            text, log = scrape(subject.process.url), subject.process.log()
        finally:
            client.config_set("client-output-buffer-limit", PUBSUB_BUFFER_LIMIT)
            client.close()
            subject.stop()
        samples = parse(text)
        lag = "celery_exporter_event_lag_seconds"
        lag_count = samples[(f"{lag}_count", frozenset())]
        within = samples[(f"{lag}_bucket", frozenset({("le", "0.25")}))]
        return {
            "reconnects": samples[("celery_exporter_broker_reconnects_total", frozenset())],
            "connected_after": samples[("celery_exporter_broker_connected", frozenset())],
            "events_lagging_over_250ms": lag_count - within,
            "cause_logged": "client-output-buffer-limit pubsub" in log,
            "log": [line for line in log.splitlines() if "broker" in line][:3],
        }


def figure(
    key: str,
    exporter: float,
    baseline: float | None,
    quick: bool,
    targets: dict[str, tuple[float, str]] = TARGETS,
    ratio_max: float | None = None,
) -> dict[str, Any]:
    bound, sense = targets[key]
    met = exporter <= bound if sense == "max" else exporter >= bound
    ratio = round(exporter / baseline, 3) if baseline else None
    if ratio_max is not None:
        met = met and ratio is not None and ratio <= ratio_max
    target = f"{'≤' if sense == 'max' else '≥'} {bound:g}"
    return {
        "exporter": round(exporter, 2),
        "baseline": baseline,
        "ratio": ratio,
        "target": target + (f", ≤ {ratio_max:g}x" if ratio_max is not None else ""),
        "met": None if quick else met,
    }


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
    }


def table(figures: dict[str, dict[str, Any]]) -> str:
    rows = [
        "| figure | exporter | Celery EventReceiver + State | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for key, values in figures.items():
        baseline = "—" if values["baseline"] is None else f"{values['baseline']:g}"
        ratio = "—" if values["ratio"] is None else f"{values['ratio']:g}x"
        met = {True: "yes", False: "**no**", None: "(quick)"}[values["met"]]
        rows.append(
            f"| {LABELS[key]} | {values['exporter']:g} | {baseline} | {ratio} "
            f"| {values['target']} | {met} |"
        )
    return "\n".join(rows)


def redis_figures(sizes: Sizes, runs: list[dict[str, Any]], quick: bool) -> dict[str, Any]:
    """Every figure on Redis, with traces, memory, /metrics and overload."""
    broker = RedisBroker(RedisServer())
    bench = Bench(sizes, broker, runs)
    sink = TraceSink()

    def traced(broker_url: str) -> Exporter:
        return Exporter(broker_url, traces=sink.endpoint)

    try:
        figures = bench.cpu_figures()
        traced_us = {
            mode: bench.cpu(traced, batched)
            for mode, batched in (("unbatched", False), ("batched", True))
        }
        for mode, us in traced_us.items():
            figures[f"traced_cpu_ratio_{mode}"] = (
                us / figures[f"cpu_us_per_event_{mode}"][0],
                None,
            )
        figures |= bench.ladders()
        figures |= {
            "rss_mb_100k_tasks": (bench.memory(Exporter), bench.memory(Baseline)),
        }
        render_ms, samples = bench.render()
        overload = bench.overload(stall=quick)
    finally:
        sink.close()
        broker.close()
    result = {
        "figures": {key: figure(key, ex, base, quick) for key, (ex, base) in figures.items()},
        "overload": overload,
        "traces": sink.counts(),
    }
    result["figures"]["metrics_render_ms"] = figure("metrics_render_ms", render_ms, None, quick)
    result["figures"]["metrics_render_ms"]["samples"] = samples
    for mode, us in traced_us.items():
        result["figures"][f"traced_cpu_ratio_{mode}"]["traced_us_per_event"] = us
    return result


def rabbitmq_figures(sizes: Sizes, runs: list[dict[str, Any]], quick: bool) -> dict[str, Any]:
    """CPU per event and the zero-loss ladder on a private RabbitMQ node."""
    broker = RabbitMQBroker(RabbitMQServer())
    bench = Bench(sizes, broker, runs)
    try:
        figures = bench.cpu_figures() | bench.ladders()
    finally:
        broker.close()
    return {
        "figures": {
            key: figure(
                key,
                ex,
                base,
                quick,
                RABBITMQ_TARGETS,
                RABBITMQ_CPU_RATIO if key.startswith("cpu_") else None,
            )
            for key, (ex, base) in figures.items()
        }
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes: proves the bench works, a few seconds per scenario",
    )
    parser.add_argument(
        "--broker",
        choices=("redis", "rabbitmq", "all"),
        default="all",
        help="which brokers to run on (default: all)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    quick = args.quick
    runs: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "machine": machine(),
        "sizes": asdict(QUICK if quick else FULL),
    }
    if args.broker in ("redis", "all"):
        result |= redis_figures(QUICK if quick else FULL, runs, quick)
    if args.broker in ("rabbitmq", "all"):
        sizes = QUICK if quick else RABBITMQ_FULL
        result["rabbitmq"] = {"sizes": asdict(sizes), **rabbitmq_figures(sizes, runs, quick)}
    result["split"] = split.figures(5_000 if quick else 200_000)
    result["runs"] = runs
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['machine']['cpu']}, {result['machine']['cores']} cores, {result['mode']} run\n")
    sections = [
        ("Redis", result.get("figures")),
        ("RabbitMQ", result.get("rabbitmq", {}).get("figures")),
    ]
    met = []
    for name, figures in sections:
        if figures:
            print(f"{name}:\n\n{table(figures)}\n")
            met += [f["met"] for f in figures.values()]
    print(f"Where an event's CPU goes (python -m bench.split):\n\n{split.table(result['split'])}\n")
    return 0 if quick or all(met) else 1
