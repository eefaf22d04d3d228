"""The ``hostname`` of task families on fleets: kept, rewritten or dropped.

On an autoscaled fleet every pod is a new hostname, so task series labelled
by worker multiply with each deploy. ``--task-hostname-rewrite`` folds pod
names to their Deployment (``celery@web-7d9f8b6c4-x2kqp`` to ``celery@web``);
``--task-hostname-label drop`` removes the label from task families. Worker
families always keep the real hostname: they are one series per worker.

The rewrite runs once per distinct hostname (``TaskHosts`` caches it), never
per event.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

from ..telemetry.metrics import Metrics
from .labels import LabelLimiter

KEEP, DROP = "keep", "drop"


class Rewrite(NamedTuple):
    """One ``pattern`` → ``replacement`` rule (Python ``re``; ``\\1`` and ``\\g<name>``)."""

    pattern: re.Pattern[str]
    replacement: str

    def __str__(self) -> str:
        return f"{self.pattern.pattern}={self.replacement}"


def compile_rewrite(pattern: str, replacement: str) -> Rewrite:
    """The rule, or ``ValueError`` saying what is wrong with it, before any event."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"pattern {pattern!r} does not compile: {exc}") from None
    try:
        compiled.sub(replacement, "")  # parses the template: groups it names must exist
    except (re.error, IndexError) as exc:
        raise ValueError(f"replacement {replacement!r} for {pattern!r}: {exc}") from None
    return Rewrite(compiled, replacement)


def rewriter(rules: Sequence[Rewrite]) -> Callable[[str], str]:
    """The hostname through the first rule whose pattern matches it, as ``re.sub`` replaces
    (the matched part; anchor with ``^…$`` to replace the whole); unmatched, as it is."""

    def rewrite(hostname: str) -> str:
        for pattern, replacement in rules:
            rewritten, found = pattern.subn(replacement, hostname, count=1)
            if found:
                return rewritten
        return hostname

    return rewrite


class TaskHosts(dict[str, str]):
    """Task families' ``hostname`` per worker hostname: rewritten, then limited, once.

    The per-event cost is one dict lookup. The label limit counts rewritten
    values, so a Deployment's pods take one slot between them; those slots are
    never released, since many workers share each value.
    """

    def __init__(self, rewrite: Callable[[str], str], limit: Callable[[str], str]) -> None:
        super().__init__()
        self._rewrite = rewrite
        self._limit = limit

    def __missing__(self, hostname: str) -> str:
        value = self[hostname] = self._limit(self._rewrite(hostname))
        return value


def fold_task_hostname(
    metrics: Metrics, mode: str, rules: Sequence[Rewrite], max_label_values: int
) -> TaskHosts | None:
    """Set the task families' ``hostname`` up, once: kept as it is (nothing changes
    per event), rewritten (a cached lookup per event) or dropped."""
    if mode == DROP:
        metrics.fold_task_hostname(None)
    elif rules:
        folded = metrics.counter("celery_exporter_label_values_folded_total")
        limiter = LabelLimiter(max_label_values, folded)
        hosts = TaskHosts(rewriter(rules), lambda value: limiter("hostname", value))
        metrics.fold_task_hostname(hosts)
        return hosts
    return None
