"""Per-task objectives and expected intervals, given by glob, exported per task name.

``--task-objective`` and ``--task-expected-interval`` map globs of task names to
a value; a name takes the value of the first glob it matches, in the order
given. The rules in ``config/prometheus/alerts.yaml`` read the exported gauges,
so one generic rule set serves every task.

Matching costs nothing per event: the tracker's tick (once a second) matches
the task names admitted since the last tick, each name once, and the label
limit bounds how many there are. A glob without wildcards names a task
outright: its gauge is set at start, before the task is seen, so a periodic
task that stopped before the exporter started is still known to be expected.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping, Set

from ..telemetry.metrics import Gauge, Metrics

WILDCARDS = re.compile(r"[*?\[]")


class Globs:
    """Task name globs in the order given: a name takes the value of the first it matches."""

    def __init__(self, values: Mapping[str, float]) -> None:
        self._patterns: list[tuple[Callable[[str], object], float]] = [
            (re.compile(fnmatch.translate(glob)).match, value) for glob, value in values.items()
        ]
        self.literals = [glob for glob in values if not WILDCARDS.search(glob)]
        """The globs that are plain task names."""

    def match(self, name: str) -> float | None:
        for matches, value in self._patterns:
            if matches(name):
                return value
        return None


class TaskTargets:
    """Sets ``celery_task_objective_ratio`` and ``celery_task_expected_interval_seconds``
    for every task name seen, and for the names the globs spell out."""

    def __init__(
        self,
        metrics: Metrics,
        objectives: Mapping[str, float],
        intervals: Mapping[str, float],
        names: Set[str],
    ) -> None:
        self._targets: list[tuple[Globs, Gauge]] = [
            (Globs(objectives), metrics.gauge("celery_task_objective_ratio")),
            (Globs(intervals), metrics.gauge("celery_task_expected_interval_seconds")),
        ]
        self._names = names  # the label limiter's admitted task names, a live view
        self._matched: set[str] = set()
        for globs, _ in self._targets:
            for name in globs.literals:
                self._set(name)

    def tick(self) -> None:
        """Match the task names admitted since the last tick (names are never released)."""
        if len(self._names) != len(self._matched):
            for name in self._names - self._matched:
                self._set(name)
            self._matched.update(self._names)

    def _set(self, name: str) -> None:
        for globs, gauge in self._targets:
            value = globs.match(name)
            if value is not None:
                gauge.set((name,), value)
