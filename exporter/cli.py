"""The command line: configuration errors as one line and exit status 2.

With no command it runs the daemon; ``events`` and ``check`` (``config.COMMANDS``)
take the daemon's broker options, by flag, environment or file alike.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import config, logs

BROKER_OPTIONS = (
    "broker_url",
    "broker_transport_options",
    "broker_ssl_options",
    "events_exchange",
    "event_queue_ttl",
    "event_queue_expires",
    "log_level",
    "log_format",
)
QUEUE_OPTIONS = ("queues", "default_queue", "queue_probe_timeout")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in config.COMMANDS:
        return command(argv[0], argv[1:])
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


def command_parser(name: str) -> argparse.ArgumentParser:
    """A command's flags: its own, and the daemon's broker options."""
    from .commands import check, events_cmd

    parser = config.CommandLineParser(
        prog=f"{config.PROG} {name}",
        description=f"{config.PROG} {name} {config.COMMANDS[name]}.",
        epilog=f"Broker options can also be set as environment variables "
        f"{config.ENV_PREFIX}<OPTION> or in the --config file, as for the daemon.",
        argument_default=argparse.SUPPRESS,
    )
    if name == "check":
        check.add_arguments(parser)
        config.add_options(parser, BROKER_OPTIONS + QUEUE_OPTIONS)
    else:
        events_cmd.add_arguments(parser)
        config.add_options(parser, BROKER_OPTIONS)
    return parser


def command(name: str, argv: Sequence[str]) -> int:
    """Run ``events`` or ``check``; its output goes to stdout, logs to stderr."""
    from .commands import check, events_cmd

    try:
        args = command_parser(name).parse_args(argv)
        settings = config.resolve(vars(args), demo=False)
    except config.ConfigError as exc:
        print(f"{config.PROG} {name}: error: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level, settings.log_format)
    run = check.run if name == "check" else events_cmd.run
    return run(settings, args, sys.stdout)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
