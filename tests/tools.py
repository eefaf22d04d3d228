"""External command-line tools the tests need: a missing one fails the run, never skips it."""

from __future__ import annotations

import shutil

import pytest

__all__ = ["promtool"]


def promtool() -> str:
    """The path of promtool, which checks the shipped rules and the generated dashboard queries."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found on PATH. Install Debian's `prometheus` package "
            "(apt-get install prometheus), which provides /usr/bin/promtool, "
            "or put a Prometheus release's promtool on PATH."
        )
    return path
