"""Turning task events on from the exporter: Celery's ``enable_events``, broadcast.

A worker started without ``-E`` sends heartbeats but no task events. The
``enable_events`` control command (what ``celery control enable_events``
sends) turns them on until the worker restarts, so it is broadcast again
every ``--enable-events-interval`` seconds for restarted and new workers.
It goes through kombu's pidbox, the mailbox Celery's own remote control
uses, so Celery is not needed at run time.
"""

from __future__ import annotations

import logging

from kombu.pidbox import Mailbox

from .config import Config
from .periodic import Periodic
from .receiver import broker_connection

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
"""Seconds a broadcast may spend connecting to, reading from or writing to the broker."""

# Celery's default control_exchange, serialised as every worker accepts.
MAILBOX = Mailbox("celery", type="fanout", serializer="json")


class EventsEnabler(Periodic):
    """Broadcasts ``enable_events`` to every worker, now and every interval."""

    name = "enable-events"

    def __init__(self, config: Config) -> None:
        super().__init__(config.enable_events_interval)
        self.config = config
        self._failing = False

    def run_once(self) -> None:
        try:
            with broker_connection(self.config, timeout=CONNECT_TIMEOUT) as connection:
                connection.ensure_connection(max_retries=0)
                # Valid until the next one is due (at least Celery's own 1 s), so a
                # busy worker or one whose clock is a little off does not drop it.
                expires = max(self.interval, 1.0)
                MAILBOX(connection)._broadcast("enable_events", {}, timeout=expires)
        except Exception as exc:
            if not self._failing:
                self._failing = True
                log.warning(
                    "could not broadcast enable_events: %s: %s; retrying every %g s",
                    type(exc).__name__,
                    exc,
                    self.interval,
                )
            return
        if self._failing:
            self._failing = False
            log.info("broadcasting enable_events again")
        log.debug("broadcast enable_events")
