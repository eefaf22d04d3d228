"""The daemon's view of itself: broker connection, loop liveness, event flow.

Written by the event thread, read by the HTTP thread for ``/healthz``,
``/readyz`` and the landing page.
"""

from __future__ import annotations

import logging
import time

from .telemetry.metrics import Metrics

log = logging.getLogger(__name__)

LOOP_STALL_SECONDS = 30.0
"""The receive loop wakes at least once a second; this long without it is a hang."""


class Health:
    """Connection state and liveness, mirrored into the self metrics."""

    def __init__(self, metrics: Metrics, broker: str) -> None:
        self.broker = broker
        self.started_at = time.time()
        self.connected = False
        self.connected_since: float | None = None
        self.last_error = ""
        self.events_received = 0
        self.last_event_at: float | None = None
        self._loop_beat = time.monotonic()
        self._connected_gauge = metrics.gauge("celery_exporter_broker_connected")
        self._reconnects = metrics.counter("celery_exporter_broker_reconnects_total")

    def beat(self) -> None:
        """The receive loop is alive."""
        self._loop_beat = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self._loop_beat < LOOP_STALL_SECONDS

    def on_connected(self) -> None:
        self.connected = True
        self.connected_since = time.time()
        self._connected_gauge.set((), 1)
        self.beat()

    def on_connection_lost(self, error: str) -> None:
        """Counted once per loss; a broker that stays away is one outage."""
        if self.connected:
            self._reconnects.inc()
        self.connected = False
        self.connected_since = None
        self.last_error = error
        self._connected_gauge.set((), 0)
