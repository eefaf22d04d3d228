"""Work that talks to the broker on a schedule, each job on its own thread.

Broker calls that may hang (queue probes, control broadcasts) stay off the
event thread and the HTTP threads: a broker that stops answering stalls
only the job's own thread, and only for as long as its timeouts allow.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

STOP_WAIT_SECONDS = 0.5
"""How long ``stop()`` waits for a broker call in flight: the daemon must stop
within 2 s, and a job's thread is a daemon thread that ends with the process."""


class Periodic:
    """Calls ``run_once()`` at start, then every ``interval`` seconds, until ``stop()``."""

    name = "periodic"

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what ``run_once()`` holds; called on the job's thread as it ends."""

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop and wait for a call in flight, for at most ``STOP_WAIT_SECONDS``."""
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(STOP_WAIT_SECONDS)
            if self._thread.is_alive():
                log.warning("%s still busy with the broker; leaving it behind", self.name)

    def _run(self) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    self.run_once()
                except Exception:  # a bug must cost one round, never the job
                    log.exception("%s failed", self.name)
                self.stopping.wait(self.interval)
        finally:
            self.close()
