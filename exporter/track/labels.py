"""Keeping label values bounded.

Task names, hostnames, queues and exception classes all come from outside
the daemon. Past ``max_values`` distinct values per label, new values are
exported as ``other`` (and counted), so a bug that puts a uuid into a task
name cannot grow the exporter without bound.
"""

from __future__ import annotations

from collections import defaultdict

from ..telemetry.metrics import Counter

OTHER = "other"
MAX_LENGTH = 200


class LabelLimiter:
    """Admits the first ``max_values`` values of each label, folds the rest."""

    def __init__(self, max_values: int, folded: Counter) -> None:
        self.max_values = max_values
        self._folded = folded
        self._seen: defaultdict[str, set[str]] = defaultdict(set)

    def __call__(self, label: str, value: str) -> str:
        """The value to export: ``value`` itself once admitted, the common case."""
        seen = self._seen[label]
        if value in seen:
            return value
        return self._admit(seen, label, value)

    def _admit(self, seen: set[str], label: str, value: str) -> str:
        """A value not seen yet: admitted while the label has room, else folded."""
        if len(value) > MAX_LENGTH:
            value = value[:MAX_LENGTH]
            if value in seen:
                return value
        if len(seen) >= self.max_values:
            self._folded.inc((label,))
            return OTHER
        seen.add(value)
        return value

    def admitted(self, label: str) -> set[str]:
        """The values of ``label`` admitted so far: the live set, read on the event thread."""
        return self._seen[label]

    def release(self, label: str, value: str) -> None:
        """Free the slot of a value that is gone (a purged worker)."""
        self._seen[label].discard(value)
