"""Every metric the daemon exports, and the storage behind them.

All names, help texts and label sets live in ``METRICS``: the README's
reference, the dashboards' tests and the code read the same table.

The storage is deliberately plain: a family is a dict from label values to
a number (or to a list of bucket counts), written by the single event thread
and copied atomically by the scrape thread. That keeps an increment at one
dict operation and a scrape independent of the broker.
"""

from __future__ import annotations

import dataclasses
import math
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.core import (
    CounterMetricFamily,
    Exemplar,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

# Defaults reach from a millisecond to an hour: Celery tasks span all of it.
DEFAULT_RUNTIME_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip
DEFAULT_WAIT_BUCKETS = DEFAULT_RUNTIME_BUCKETS
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PROBE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FLOWER_RUNTIME_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
"""Flower's default ``--task_runtime_metric_buckets`` (prometheus_client's defaults)."""
CREATED = "_created"
FLOWER = "flower_"
"""The prefix of Flower's families, served only with ``--flower-metrics``."""

TASK = ("name", "hostname", "queue")
TASK_EXC = ("name", "hostname", "queue", "exception")
NAME_QUEUE = ("name", "queue")
HOST = ("hostname",)


@dataclass(frozen=True)
class MetricSpec:
    """One exported family: its full name (counters end in ``_total``)."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()


METRICS: tuple[MetricSpec, ...] = (
    # Tasks, from the event stream.
    MetricSpec("celery_task_sent_total", COUNTER,
               "Tasks published by clients (task-sent events).", NAME_QUEUE),
    MetricSpec("celery_task_received_total", COUNTER,
               "Tasks received by a worker.", TASK),
    MetricSpec("celery_task_started_total", COUNTER,
               "Tasks started by a worker.", TASK),
    MetricSpec("celery_task_succeeded_total", COUNTER,
               "Tasks that succeeded.", TASK),
    MetricSpec("celery_task_failed_total", COUNTER,
               "Tasks that failed, by exception class.", TASK_EXC),
    MetricSpec("celery_task_retried_total", COUNTER,
               "Task retries, by the exception that caused them.", TASK_EXC),
    MetricSpec("celery_task_rejected_total", COUNTER,
               "Tasks rejected by a worker.", TASK),
    MetricSpec("celery_task_revoked_total", COUNTER,
               "Tasks revoked, terminated or expired.", TASK),
    MetricSpec("celery_task_runtime_seconds", HISTOGRAM,
               "Run time of succeeded tasks, as measured by the worker.", NAME_QUEUE),
    MetricSpec("celery_task_prefetch_wait_seconds", HISTOGRAM,
               "Time from task-received to task-started (waiting in the worker).", NAME_QUEUE),
    MetricSpec("celery_task_queue_wait_seconds", HISTOGRAM,
               "Time from task-sent (or its ETA, if later) to task-started.", NAME_QUEUE),
    MetricSpec("celery_task_failed_runtime_seconds", HISTOGRAM,
               "Run time of failed tasks: task-started to task-failed, on the worker's clock.",
               NAME_QUEUE),
    # Tasks in flight, from the task table.
    MetricSpec("celery_task_running", GAUGE,
               "Tasks started and not yet finished.", NAME_QUEUE),
    MetricSpec("celery_task_oldest_running_start_timestamp_seconds", GAUGE,
               "task-started time of the longest-running task (absent when none runs).",
               NAME_QUEUE),
    MetricSpec("celery_task_interrupted_total", COUNTER,
               "Tasks running on a worker when it was lost (no heartbeat for "
               "--worker-timeout).", TASK),
    # Objectives and periodic tasks.
    MetricSpec("celery_task_last_succeeded_timestamp_seconds", GAUGE,
               "Worker's time of the latest task-succeeded (Unix time), never later than "
               "its arrival.", NAME_QUEUE),
    MetricSpec("celery_task_objective_ratio", GAUGE,
               "Success objective of the task name (--task-objective), for names seen and "
               "names given literally.", ("name",)),
    MetricSpec("celery_task_expected_interval_seconds", GAUGE,
               "Expected seconds between successes of the task name "
               "(--task-expected-interval), for names seen and names given literally.",
               ("name",)),
    # Workers, from heartbeats.
    MetricSpec("celery_worker_up", GAUGE,
               "1 while the worker's heartbeats arrive, 0 once they stop or it goes offline.",
               HOST),
    MetricSpec("celery_worker_last_heartbeat_timestamp_seconds", GAUGE,
               "Arrival time of the worker's last heartbeat (Unix time).", HOST),
    MetricSpec("celery_worker_tasks_active", GAUGE,
               "Tasks executing on the worker, from its last heartbeat.", HOST),
    MetricSpec("celery_worker_tasks_prefetched", GAUGE,
               "Tasks received by the worker and not yet started, ETA tasks aside.", HOST),
    MetricSpec("celery_worker_tasks_scheduled", GAUGE,
               "Tasks received by the worker and held until their ETA (countdowns, retries).",
               HOST),
    MetricSpec("celery_worker_tasks_processed_total", COUNTER,
               "Tasks the worker has processed since it started, from its heartbeat.", HOST),
    MetricSpec("celery_worker_info", GAUGE,
               "Worker software, always 1.", ("hostname", "sw_ident", "sw_ver", "sw_sys")),
    # Queues, from broker probes.
    MetricSpec("celery_queue_length", GAUGE,
               "Messages waiting in the queue, priority sub-queues included.", ("queue",)),
    MetricSpec("celery_queue_consumers", GAUGE,
               "Consumers of the queue, where the broker reports them.", ("queue",)),
    MetricSpec("celery_exporter_queue_probe_errors_total", COUNTER,
               "Queue probes that failed or timed out.", ("queue",)),
    MetricSpec("celery_exporter_queue_probe_duration_seconds", HISTOGRAM,
               "Duration of one queue probe."),
    # Worker capacity, from inspect replies.
    MetricSpec("celery_worker_pool_size", GAUGE,
               "Pool slots: the pool's max-concurrency, or the autoscaler's current maximum.",
               HOST),
    MetricSpec("celery_worker_prefetch_limit", GAUGE,
               "The worker consumer's prefetch count (0: no limit).", HOST),
    MetricSpec("celery_worker_queue_info", GAUGE,
               "1 for each queue a live worker consumes (active_queues).", ("hostname", "queue")),
    MetricSpec("celery_queue_workers", GAUGE,
               "Live workers consuming the queue (active_queues).", ("queue",)),
    MetricSpec("celery_exporter_inspect_duration_seconds", HISTOGRAM,
               "Duration of one inspect round (stats and active_queues)."),
    MetricSpec("celery_exporter_inspect_replies", GAUGE,
               "Workers that answered the last inspect round."),
    MetricSpec("celery_exporter_inspect_errors_total", COUNTER,
               "Inspect rounds that failed (broker) or missed a live worker (timeout).",
               ("reason",)),
    MetricSpec("celery_exporter_inspect_replies_invalid_total", COUNTER,
               "Inspect replies, or parts of them, dropped as invalid, by reason.", ("reason",)),
    # The exporter itself.
    MetricSpec("celery_exporter_events_total", COUNTER,
               "Events received, by type (unknown types count as 'other').", ("type",)),
    MetricSpec("celery_exporter_events_invalid_total", COUNTER,
               "Messages or events dropped as invalid, by reason.", ("reason",)),
    MetricSpec("celery_exporter_event_lag_seconds", HISTOGRAM,
               "Arrival time minus the event's own timestamp."),
    MetricSpec("celery_exporter_events_missed_total", COUNTER,
               "task-started events the workers' heartbeats count but that never arrived."),
    MetricSpec("celery_exporter_broker_connected", GAUGE,
               "1 while connected to the broker."),
    MetricSpec("celery_exporter_broker_reconnects_total", COUNTER,
               "Connections to the broker lost (each followed by reconnection attempts)."),
    MetricSpec("celery_exporter_tracked_tasks", GAUGE,
               "Tasks in flight held in the task table."),
    MetricSpec("celery_exporter_tracked_tasks_evicted_total", COUNTER,
               "Unfinished tasks evicted from the full task table."),
    MetricSpec("celery_exporter_tasks_reconciled_total", COUNTER,
               "Corrections of the task table from the workers' own task lists (inspect), "
               "by reason.", ("reason",)),
    MetricSpec("celery_exporter_label_values_folded_total", COUNTER,
               "Label values beyond --max-label-values, exported as 'other'.", ("label",)),
    MetricSpec("celery_exporter_build_info", GAUGE,
               "The exporter's version, always 1.", ("version",)),
    MetricSpec("celery_exporter_spans_total", COUNTER,
               "Spans exported, dropped (queue full, collector refused or unreachable) "
               "or retried, with --otlp-traces.", ("outcome",)),
    # Flower 2.x's families under Flower's names and labels, with --flower-metrics only.
    MetricSpec("flower_events_total", COUNTER,
               "Task events, by worker (the client's hostname for task-sent), type and task "
               "name, as Flower counts them.", ("worker", "type", "task")),
    MetricSpec("flower_events_created", GAUGE,
               "Unix time each flower_events_total series began, as Flower's prometheus_client "
               "serves it.", ("worker", "type", "task")),
    MetricSpec("flower_task_runtime_seconds", HISTOGRAM,
               "Run time of succeeded tasks as the worker reports it, in Flower's buckets.",
               ("worker", "task")),
    MetricSpec("flower_task_runtime_seconds_created", GAUGE,
               "Unix time each flower_task_runtime_seconds series began, as Flower's "
               "prometheus_client serves it.", ("worker", "task")),
    MetricSpec("flower_task_prefetch_time_seconds", GAUGE,
               "task-received to task-started of the last task of the name to start there, "
               "0 once it finished (tasks without an ETA), as Flower sets it.",
               ("worker", "task")),
    MetricSpec("flower_worker_prefetched_tasks", GAUGE,
               "Tasks without an ETA received and not yet started, as Flower counts them.",
               ("worker", "task")),
    MetricSpec("flower_worker_online", GAUGE,
               "1 from the worker's last worker-online or heartbeat, 0 from worker-offline.",
               ("worker",)),
    MetricSpec("flower_worker_number_of_currently_executing_tasks", GAUGE,
               "Tasks executing on the worker, from its last heartbeat.", ("worker",)),
)  # fmt: skip

SPECS: dict[str, MetricSpec] = {spec.name: spec for spec in METRICS}

TASK_HOST_FAMILIES = tuple(
    spec.name
    for spec in METRICS
    if spec.name.startswith("celery_task_") and "hostname" in spec.labels
)
"""Task families labelled by worker (always their second label): what --task-hostname-label
and --task-hostname-rewrite change."""

LabelValues = tuple[str, ...]


class Counter:
    """Monotonic values per label set."""

    def __init__(self, spec: MetricSpec) -> None:
        self.spec = spec
        self.values: dict[LabelValues, float] = {}

    def inc(self, labels: LabelValues = (), amount: float = 1.0) -> None:
        values = self.values
        values[labels] = values.get(labels, 0.0) + amount

    def set_total(self, labels: LabelValues, value: float) -> None:
        """Mirror a total counted elsewhere (a worker's own processed count)."""
        self.values[labels] = value

    def get(self, labels: LabelValues = ()) -> float:
        return self.values.get(labels, 0.0)


class Gauge(Counter):
    """A value per label set that may go up and down."""

    def set(self, labels: LabelValues, value: float) -> None:
        self.values[labels] = value

    def remove(self, labels: LabelValues) -> None:
        """Drop a series whose value is no longer known."""
        self.values.pop(labels, None)


class Histogram:
    """Bucket counts per label set; the last two slots hold +Inf and the sum."""

    def __init__(self, spec: MetricSpec, bounds: Sequence[float]) -> None:
        self.spec = spec
        self.bounds = tuple(bounds)
        self.edges = (*(_bound_text(bound) for bound in self.bounds), "+Inf")
        self.values: dict[LabelValues, list[float]] = {}

    def observe(self, labels: LabelValues, value: float) -> None:
        series = self.values.get(labels)
        if series is None:
            series = self.values[labels] = [0] * (len(self.bounds) + 1) + [0.0]
        series[bisect_left(self.bounds, value)] += 1
        series[-1] += value

    def buckets(self, series: list[float]) -> tuple[list[tuple[str, float]], float]:
        """``(le, cumulative count)`` per bucket, and the sum, of one series.

        Read from a copy: the event thread may be adding to the series.
        """
        series = list(series)
        cumulative, buckets = 0.0, []
        for edge, count in zip(self.edges, series, strict=False):
            cumulative += count
            buckets.append((edge, cumulative))
        return buckets, series[-1]


class HostlessCounter(Counter):
    """A task family with --task-hostname-label drop: stored without its ``hostname``, so
    one series sums every worker's. The tracker's keys still name the worker."""

    def inc(self, labels: LabelValues = (), amount: float = 1.0) -> None:
        key = labels[:1] + labels[2:]
        values = self.values
        values[key] = values.get(key, 0.0) + amount


class RewrittenHostCounter(Counter):
    """A task family with --task-hostname-rewrite: its ``hostname`` mapped through
    ``hosts`` (``exporter.track.hostnames.TaskHosts``), one dict lookup an increment."""

    def __init__(self, spec: MetricSpec, hosts: Mapping[str, str]) -> None:
        super().__init__(spec)
        self.hosts = hosts

    def inc(self, labels: LabelValues = (), amount: float = 1.0) -> None:
        key = (labels[0], self.hosts[labels[1]], *labels[2:])
        values = self.values
        values[key] = values.get(key, 0.0) + amount


Family = Counter | Gauge | Histogram
ExemplarData = tuple[int, int, float, float]
"""An exemplar as the event thread stores it: trace id, span id, value, Unix time."""


class Exemplars:
    """The trace of a recent observation in each bucket of a histogram's series.

    Kept apart from the histogram, written by span hooks after the tracker's
    handler observed the same value, so an untraced observation pays nothing.
    Bounded by one exemplar per bucket per series.
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.values: dict[LabelValues, dict[int, ExemplarData]] = {}

    def put(
        self, labels: LabelValues, value: float, trace_id: int, span_id: int, timestamp: float
    ) -> None:
        series = self.values.get(labels)
        if series is None:
            series = self.values[labels] = {}
        series[bisect_left(self.bounds, value)] = (trace_id, span_id, value, timestamp)

    def of(self, labels: LabelValues) -> list[Exemplar | None]:
        """Per bucket (+Inf last), its exemplar in prometheus_client's form, or None."""
        series = dict(self.values.get(labels, {}))  # a copy: the event thread writes
        found: list[Exemplar | None] = [None] * (len(self.bounds) + 1)
        for index, (trace_id, span_id, value, timestamp) in series.items():
            ids = {"trace_id": f"{trace_id:032x}", "span_id": f"{span_id:016x}"}
            found[index] = Exemplar(ids, value, timestamp)
        return found


class Metrics(Collector):
    """The daemon's metric families, exposed as one Prometheus collector.

    ``static_labels`` are added to every series at exposition time, so the
    per-event path never sees them.
    """

    def __init__(
        self,
        *,
        runtime_buckets: Sequence[float] = DEFAULT_RUNTIME_BUCKETS,
        wait_buckets: Sequence[float] = DEFAULT_WAIT_BUCKETS,
        static_labels: Mapping[str, str] | None = None,
        flower_metrics: bool = False,
    ) -> None:
        buckets = {
            "celery_task_runtime_seconds": runtime_buckets,
            "celery_task_prefetch_wait_seconds": wait_buckets,
            "celery_task_queue_wait_seconds": wait_buckets,
            "celery_task_failed_runtime_seconds": runtime_buckets,
            "celery_exporter_event_lag_seconds": LAG_BUCKETS,
            "celery_exporter_queue_probe_duration_seconds": PROBE_BUCKETS,
            "celery_exporter_inspect_duration_seconds": PROBE_BUCKETS,
            "flower_task_runtime_seconds": FLOWER_RUNTIME_BUCKETS,
        }
        self.static_labels = dict(static_labels or {})
        self.families: dict[str, Family] = {}
        self.exemplars: dict[str, Exemplars] = {}
        """Per histogram, when something (traces) records exemplars for it."""
        for spec in METRICS:
            if spec.name.startswith(FLOWER) and not flower_metrics:
                continue  # absent, not empty, when off
            if spec.kind == HISTOGRAM:
                self.families[spec.name] = Histogram(spec, buckets[spec.name])
            elif spec.kind == GAUGE:
                self.families[spec.name] = Gauge(spec)
            else:
                self.families[spec.name] = Counter(spec)
        self.created: dict[str, Gauge] = {
            parent: family
            for name, family in self.families.items()
            if name.endswith(CREATED) and type(family) is Gauge
            for parent in (name.removesuffix(CREATED) + "_total", name.removesuffix(CREATED))
            if parent in self.families
        }
        """The start times of a family's series, in a gauge family named after it (Flower's
        ``flower_events_created``): the text format serves them as a family of their own,
        as prometheus_client does, OpenMetrics as the family's ``_created`` samples."""
        # Families without labels exist from the start, so they read 0, not absent.
        for family in self.families.values():
            if not family.spec.labels and not isinstance(family, Histogram):
                family.values[()] = 0.0

    def counter(self, name: str) -> Counter:
        family = self.families[name]
        assert isinstance(family, Counter) and not isinstance(family, Gauge), name
        return family

    def gauge(self, name: str) -> Gauge:
        family = self.families[name]
        assert type(family) is Gauge, name
        return family

    def histogram(self, name: str) -> Histogram:
        family = self.families[name]
        assert type(family) is Histogram, name
        return family

    def exemplars_of(self, name: str) -> Exemplars:
        """The exemplar store of a histogram, made on first use; OpenMetrics shows it."""
        store = self.exemplars.get(name)
        if store is None:
            store = self.exemplars[name] = Exemplars(self.histogram(name).bounds)
        return store

    def fold_task_hostname(self, hosts: Mapping[str, str] | None) -> None:
        """Store the task families' ``hostname`` through ``hosts`` (a rewrite), or not at all
        (None: drop). Once, before the first event: the tracker's counters are these."""
        for name in TASK_HOST_FAMILIES:
            spec = self.families[name].spec
            if hosts is None:
                labels = tuple(label for label in spec.labels if label != "hostname")
                self.families[name] = HostlessCounter(dataclasses.replace(spec, labels=labels))
            else:
                self.families[name] = RewrittenHostCounter(spec, hosts)

    def forget(self, label: str, value: str) -> None:
        """Drop every series whose ``label`` is ``value`` (a purged worker). Rewritten task
        series stay: other workers count in them too."""
        for family in self.families.values():
            if label in family.spec.labels and not isinstance(family, RewrittenHostCounter):
                index = family.spec.labels.index(label)
                for key in [key for key in list(family.values) if key[index] == value]:
                    family.values.pop(key, None)

    def collect(self) -> Iterator[Metric]:
        extra_names = tuple(self.static_labels)
        extra_values = tuple(self.static_labels.values())
        folded = set(self.created.values())
        for family in self.families.values():
            if family in folded:
                continue  # served as the _created samples of its family
            spec = family.spec
            labels = list(spec.labels + extra_names)
            # Copy first: the event thread may add series while we render.
            items = list(family.values.items())
            created = self.created.get(spec.name)
            starts = dict(created.values) if created is not None else {}
            if isinstance(family, Histogram):
                exemplars = self.exemplars.get(spec.name)
                yield _histogram_family(family, labels, items, extra_values, exemplars, starts)
                continue
            if isinstance(family, Gauge):
                metric: Metric = GaugeMetricFamily(spec.name, spec.help, labels=labels)
                for key, value in items:
                    metric.add_metric(key + extra_values, value)
            else:
                metric = CounterMetricFamily(spec.name[: -len("_total")], spec.help, labels=labels)
                for key, value in items:
                    metric.add_metric(key + extra_values, value, created=starts.get(key))
            yield metric


def _histogram_family(
    family: Histogram,
    labels: list[str],
    items: Iterable[tuple[LabelValues, list[float]]],
    extra_values: LabelValues,
    exemplars: Exemplars | None = None,
    starts: Mapping[LabelValues, float] | None = None,
) -> HistogramMetricFamily:
    metric = HistogramMetricFamily(family.spec.name, family.spec.help, labels=labels)
    for key, series in items:
        buckets, total = family.buckets(series)
        if exemplars is not None:
            buckets = [
                (edge, count, exemplar) if exemplar else (edge, count)
                for (edge, count), exemplar in zip(buckets, exemplars.of(key), strict=True)
            ]
        metric.add_metric(list(key + extra_values), buckets, total)
        if starts and key in starts:  # add_metric takes no start time for histograms
            label_set = dict(zip(labels, key + extra_values, strict=True))
            metric.samples.append(Sample(f"{family.spec.name}{CREATED}", label_set, starts[key]))
    return metric


def _bound_text(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))
