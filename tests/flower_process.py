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
    ``-E``) and its state is not persisted.
    """

    def __init__(self, broker_url: str, directory: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / f"flower-{self.port}.log"
        self._log: IO[bytes] | None = open(self.log_path, "wb")  # noqa: SIM115 - closed on stop
        # As Flower runs by default: with prometheus_client's _created series.
        env = dict(os.environ)
        env.pop("PROMETHEUS_DISABLE_CREATED_SERIES", None)
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
            env=env,
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
    """The ``flower_*`` families of an exposition text that hold series, by name (counters
    without ``_total``). The ``_created`` samples OpenMetrics keeps in their family become
    a gauge family of their own, as the text format has them."""
    families: dict[str, Family] = {}
    parse = openmetrics_families if openmetrics else text_string_to_metric_families
    for family in parse(text):
        if not family.name.startswith("flower_"):
            continue
        for sample in family.samples:
            name, kind = family.name, family.type
            if openmetrics and sample.name.endswith("_created"):
                name, kind = sample.name, "gauge"
            samples = families.setdefault(name, (kind, {}))[1]
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return families


def without_created(families: dict[str, Family], since: float, until: float) -> dict[str, Family]:
    """The families with the values of the ``_created`` ones (when each series began)
    replaced by True, once each is checked to lie between ``since`` and ``until``."""
    kept = {}
    for name, (kind, samples) in families.items():
        if name.endswith("_created"):
            late = {key: value for key, value in samples.items() if not since <= value <= until}
            assert not late, f"{name}: began outside [{since}, {until}]: {late}"
            samples = dict.fromkeys(samples, True)
        kept[name] = (kind, samples)
    return kept
