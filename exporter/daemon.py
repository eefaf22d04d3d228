"""Wiring: broker → decode → track → metrics → HTTP, and a clean stop."""

from __future__ import annotations

import gc
import logging
import signal
import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

from . import __version__
from .broker.amqp_reader import PROTOCOL
from .broker.receiver import Receiver
from .broker.transport import receiver_class
from .config import Config
from .decode import REASONS
from .health import Health
from .probes.control import EventsEnabler
from .probes.inspection import Inspector
from .probes.periodic import Periodic
from .probes.queues import QueuePoller
from .telemetry.exposition import Registry
from .telemetry.flower import FlowerMetrics
from .telemetry.metrics import Metrics
from .track.pipeline import UNPROCESSABLE, Pipeline
from .track.tracker import SpanHooks, Tracker
from .web.overview import FailureRing, History, Overview
from .web.server import ExporterServer, Status, WorkerStatus, serve
from .web.tasks import TaskLookup
from .web.webconfig import WebSecurity

log = logging.getLogger(__name__)

RECEIVER_STOP_SECONDS = 1.0
"""How long a stop waits for the receiver to close its connection (on AMQP that
removes its queue at once; otherwise the broker drops it with the connection)."""
YOUNG_COLLECTION_THRESHOLD = 20_000
"""Objects allocated, net of those freed, before the collector's youngest pass (700 by
default). Spans live until their batch is sent: at the default, each pass finds
hundreds alive and walks them, 3 % of the CPU with traces on at 200,000 events/s.
Few of the daemon's objects form cycles."""


@dataclass
class Daemon:
    """The parts of a running exporter, built from a ``Config``."""

    config: Config
    registry: CollectorRegistry
    metrics: Metrics
    health: Health
    tracker: Tracker
    receiver: Receiver
    overview: Overview
    background: tuple[Periodic, ...] = ()
    tasks: TaskLookup | None = None

    @classmethod
    def build(cls, config: Config) -> Daemon:
        metrics = Metrics(
            runtime_buckets=config.runtime_buckets,
            wait_buckets=config.wait_buckets,
            static_labels=config.static_labels,
            flower_metrics=config.flower_metrics,
        )
        metrics.gauge("celery_exporter_build_info").set((__version__,), 1)
        for reason in (*REASONS, UNPROCESSABLE, PROTOCOL):
            metrics.counter("celery_exporter_events_invalid_total").inc((reason,), 0)
        registry = Registry()
        registry.register(metrics)
        # The process's own CPU, memory and descriptors, as every Python exporter serves them.
        registry.register(ProcessCollector(registry=None))
        registry.register(PlatformCollector(registry=None))
        health = Health(metrics, config.masked_broker_url())
        failures = FailureRing(config.recent_failures) if config.recent_failures else None
        flower = FlowerMetrics(metrics, config.max_tracked_tasks) if config.flower_metrics else None
        tracker = Tracker(
            metrics,
            max_tracked_tasks=config.max_tracked_tasks,
            default_queue=config.default_queue,
            worker_timeout=config.worker_timeout,
            purge_offline_after=config.purge_offline_after,
            max_label_values=config.max_label_values,
            spans=_spans(config, metrics),
            on_failure=failures.record if failures else None,
            task_hostname_label=config.task_hostname_label,
            task_hostname_rewrite=config.task_hostname_rewrite,
            flower=flower,
            recent_tasks=config.recent_tasks,
            task_objectives=config.task_objectives,
            task_expected_intervals=config.task_expected_intervals,
        )
        history = History(metrics, health)
        pipeline = Pipeline(tracker, health, metrics, on_tick=history.sample)
        receiver = receiver_class(config.broker_url)(config, pipeline, health)
        poller = QueuePoller(config, metrics, tracker.queues_seen)
        background: tuple[Periodic, ...] = (poller,)
        if config.enable_events:
            background += (EventsEnabler(config),)
        if config.inspect_interval:
            background += (Inspector(config, metrics, tracker, poller.queues),)
        overview = Overview(metrics, history, failures)
        tasks = TaskLookup(tracker, failures, config.recent_tasks) if config.recent_tasks else None
        return cls(
            config, registry, metrics, health, tracker, receiver, overview, background, tasks
        )

    def start_background(self) -> None:
        """Start the jobs that ask the broker on a schedule (queue probes, enable_events,
        inspect rounds)."""
        for job in self.background:
            job.start()

    def stop_background(self) -> None:
        for job in self.background:
            job.stopping.set()  # all at once: each may be waiting on the broker
        for job in self.background:
            job.stop()

    def status(self) -> Status:
        health = self.health
        workers = tuple(
            WorkerStatus(w.hostname, w.up, w.last_seen, w.info[1])
            for w in sorted(list(self.tracker.workers.workers.values()), key=lambda w: w.hostname)
        )
        return Status(
            broker=health.broker,
            connected=health.connected,
            alive=health.alive(),
            last_error=health.last_error,
            started_at=health.started_at,
            events_received=health.events_received,
            last_event_at=health.last_event_at,
            workers=workers,
        )

    def serve(self) -> ExporterServer:
        path = self.config.web_config_file
        security = WebSecurity(path) if path else None
        server = serve(
            self.config.host,
            self.config.port,
            self.registry,
            self.status,
            security,
            overview=lambda: self.overview.view(self.status()),
            tasks=self.tasks.answer if self.tasks else None,
        )
        scheme = "https" if security and security.current().ssl_context else "http"
        log.info(
            "serving the overview on %s://%s:%d/ and metrics on /metrics",
            scheme,
            self.config.host,
            server.server_address[1],
        )
        return server

    def run(self) -> None:
        """Serve and receive until SIGTERM or SIGINT."""
        server = self.serve()
        # Modules and wiring live as long as the process: frozen, they are left out of
        # the collector's full passes, which then visit only what the events create.
        gc.freeze()
        gc.set_threshold(YOUNG_COLLECTION_THRESHOLD)
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self._on_signal)
        self.start_background()
        # The receiver gets a thread of its own: a broker that accepts and never
        # answers may hold it in a socket call, and the stop must not wait for that.
        receiving = threading.Thread(target=self.receiver.run, name="receiver", daemon=True)
        receiving.start()
        try:
            while not self.receiver.stopping.wait(1.0):
                if not receiving.is_alive():  # only a bug ends it: its traceback is logged
                    raise RuntimeError("the receiver stopped unexpectedly")
        finally:
            self.receiver.stop()
            receiving.join(RECEIVER_STOP_SECONDS)
            self.stop_background()
            if self.tracker.spans is not None:
                self.tracker.spans.close()
            server.shutdown()
            server.server_close()
            log.info("stopped")

    def _on_signal(self, signum: int, frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        self.receiver.stop()


def _spans(config: Config, metrics: Metrics) -> SpanHooks | None:
    """Span hooks when traces are on; only then is OpenTelemetry imported."""
    if not config.otlp_traces:
        return None
    from .telemetry import tracing

    return tracing.build(metrics, config.trace_sample_ratio)
