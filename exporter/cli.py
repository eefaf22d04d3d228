"""The command line: configuration errors as one line and exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from . import config, logs


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = config.load(argv)
    except config.ConfigError as exc:
        print(f"{config.PROG}: error: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level, settings.log_format)
    if settings.demo:
        from . import demo  # needs Celery, which only the demo does

        return demo.run(settings)
    from .daemon import Daemon

    try:
        Daemon.build(settings).run()
    except config.ConfigError as exc:  # found while building: an optional package is missing
        print(f"{config.PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the port is taken, most often
        print(f"{config.PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
