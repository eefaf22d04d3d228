"""Keeping label values bounded.

Task names, hostnames, queues and exception classes all come from outside
the daemon. Past ``max_values`` distinct values per label, new values are
exported as ``other`` (and counted), so a bug that puts a uuid into a task
name cannot grow the exporter without bound.
"""

from __future__ import annotations

from .metrics import Counter

OTHER = "other"
MAX_LENGTH = 200


class LabelLimiter:
    """Admits the first ``max_values`` values of each label, folds the rest."""

    def __init__(self, max_values: int, folded: Counter) -> None:
        self.max_values = max_values
        self._folded = folded
        self._seen: dict[str, set[str]] = {}

    def __call__(self, label: str, value: str) -> str:
        seen = self._seen.get(label)
        if seen is None:
            seen = self._seen[label] = set()
        if value in seen:
            return value
        if len(value) > MAX_LENGTH:
            value = value[:MAX_LENGTH]
            if value in seen:
                return value
        if len(seen) >= self.max_values:
            self._folded.inc((label,))
            return OTHER
        seen.add(value)
        return value

    def release(self, label: str, value: str) -> None:
        """Free the slot of a value that is gone (a purged worker)."""
        self._seen.get(label, set()).discard(value)
