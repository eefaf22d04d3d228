"""A real Flower (``celery flower``) beside the exporter, to compare their metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import IO, Self

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import GroupGuard, free_port, reap_group, wait_for

Family = tuple[str, dict[tuple[str, frozenset], float]]
"""A family as read from text: its type, and its samples by (name, labels)."""


class FlowerProcess:
    """``celery --broker URL flower`` in its own session, serving on a free port.

    Flower's periodic ``enable_events`` broadcasts are off (the workers run with
    ``-E``), its state is not persisted, and prometheus_client's ``_created``
    series are off, so its ``/metrics`` holds Flower's own families only.
    """

    def __init__(self, broker_url: str, directory: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / f"flower-{self.port}.log"
        self._log: IO[bytes] | None = open(self.log_path, "wb")  # noqa: SIM115 - closed on stop
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "--broker",
                broker_url,
                "flower",
                f"--port={self.port}",
                "--address=127.0.0.1",
                "--persistent=False",
                "--enable_events=False",
            ],
            cwd=directory,
            env={**os.environ, "PROMETHEUS_DISABLE_CREATED_SERIES": "True"},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._guard: GroupGuard | None = GroupGuard(self.process.pid)

    def wait_serving(self, timeout: float = 60.0) -> Self:
        def serving() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"flower exited:\n{self.log()}")
            return bool(self.metrics_text())

        wait_for(serving, timeout, lambda: f"flower not serving:\n{self.log()}", ignore=(OSError,))
        return self

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
            return response.read().decode()

    def log(self) -> str:
        if self._log is not None:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        reap_group(self.process, self._guard, self._log)
        self._guard = self._log = None


def flower_families(text: str, openmetrics: bool = False) -> dict[str, Family]:
    """The ``flower_*`` families of an exposition text, by name (counters without ``_total``)."""
    parse = openmetrics_families if openmetrics else text_string_to_metric_families
    return {
        family.name: (
            family.type,
            {(s.name, frozenset(s.labels.items())): s.value for s in family.samples},
        )
        for family in parse(text)
        if family.name.startswith("flower_")
    }
