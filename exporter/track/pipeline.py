"""The per-message path: decode, validate, track.

Broken input is counted in ``celery_exporter_events_invalid_total{reason}``
and dropped; valid events in the same batch still count. Nothing a message
contains can stop the daemon.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..decode import MALFORMED, InvalidMessage, check_event, decode_body, unwrap_redis_envelope
from ..health import Health
from ..logs import Throttle
from ..telemetry.metrics import Metrics
from .tracker import Tracker

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0
UNPROCESSABLE = "unprocessable"


class Pipeline:
    """Receives raw messages from a receiver and applies their events."""

    def __init__(
        self,
        tracker: Tracker,
        health: Health,
        metrics: Metrics,
        on_tick: Callable[[float], None] | None = None,
    ) -> None:
        self.tracker = tracker
        self.health = health
        self.on_tick = on_tick  # at each tick too, on this thread: the overview's history
        self._invalid = metrics.counter("celery_exporter_events_invalid_total")
        self._next_tick = 0.0
        self._throttle = Throttle()

    def on_envelope(self, data: bytes, arrival: float) -> None:
        """A message as kombu stores it on Redis: JSON around the body."""
        try:
            body, content_type = unwrap_redis_envelope(data)
        except InvalidMessage as exc:
            self._drop(exc.reason, str(exc))
        else:
            self.on_body(body, content_type, arrival)

    def on_body(self, body: bytes, content_type: str | None, arrival: float) -> None:
        try:
            events = decode_body(body, content_type)
        except InvalidMessage as exc:
            self._drop(exc.reason, str(exc))
            events = []
        handle = self.tracker.handle
        for event in events:
            reason = check_event(event)
            if reason is not None:
                self._drop(reason, repr(event)[:200])
                continue
            try:
                handle(event, arrival)
            except Exception:  # a bug must cost one event, never the daemon
                log.exception("could not process event %r", repr(event)[:200])
                self._invalid.inc((UNPROCESSABLE,))
        health = self.health
        health.events_received += len(events)
        health.last_event_at = arrival
        if arrival >= self._next_tick:
            self.on_idle(arrival)

    def on_idle(self, now: float) -> None:
        """Called at least once a second by the receiver, and after messages."""
        if now >= self._next_tick:
            self._next_tick = now + TICK_SECONDS
            self.tracker.tick(now)
            self.health.beat()
            if self.on_tick is not None:
                self.on_tick(now)

    def on_unreadable(self, detail: str, reason: str = MALFORMED) -> None:
        """A message the transport itself could not parse, so never reached us."""
        self._drop(reason, detail)

    def _drop(self, reason: str, detail: str) -> None:
        self._invalid.inc((reason,))
        self.dropped(reason, detail)

    def dropped(self, reason: str, detail: str) -> None:
        """Tell of a dropped message: here once a minute per reason in the log; the
        commands that print events override it to show each."""
        if self._throttle.due(reason):
            log.warning(
                "dropped invalid event (%s): %s; more of these are only counted in "
                "celery_exporter_events_invalid_total for the next minute",
                reason,
                detail,
            )
