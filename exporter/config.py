"""Configuration: every option as a CLI flag, an environment variable and a YAML key.

The ``Config`` dataclass is the one list of options. Each field carries its
flag's help text, group and parser, so the CLI, the environment, the YAML
file and the documentation cannot disagree. Precedence is CLI, then
environment (``CELERY_EXPORTER_<KEY>``), then the file, then the default.
Any mistake raises ``ConfigError`` naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from . import __version__
from .parsers import (
    Parser,
    integer,
    parse_boolean,
    parse_buckets,
    parse_choice,
    parse_labels,
    parse_number,
    parse_options,
    parse_rewrites,
    parse_task_globs,
    parse_text,
    parse_text_list,
    parse_web_config_file,
)
from .telemetry.metrics import DEFAULT_RUNTIME_BUCKETS, DEFAULT_WAIT_BUCKETS
from .track import hostnames

ENV_PREFIX = "CELERY_EXPORTER_"
PROG = "celery-events-exporter"


class ConfigError(ValueError):
    """A configuration mistake, worded for a one-line message."""


def option(
    default: Any,
    help: str,
    *,
    group: str,
    parse: Parser = parse_text,
    metavar: str | None = None,
    repeat: bool = False,
) -> Any:
    """A ``Config`` field with what the CLI, environment and file need to know."""
    metadata = {"help": help, "group": group, "parse": parse, "metavar": metavar, "repeat": repeat}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


BROKER, EVENTS, TASKS, WORKERS, QUEUES, METRICS, HTTP, TRACING, LOGS, RUN = (
    "broker", "events", "task tracking", "workers", "queues", "metrics", "HTTP endpoint",
    "tracing", "logging", "running",
)  # fmt: skip


@dataclass(frozen=True)
class Config:
    """The daemon's validated configuration."""

    broker_url: str = option(
        "",
        "Broker URL: redis://, rediss://, sentinel://, amqp://, amqps:// or filesystem://. "
        "Required unless --demo.",
        group=BROKER,
        metavar="URL",
    )
    broker_transport_options: dict[str, Any] = option(
        {},
        "kombu transport option key=value (repeatable); values parse as JSON where they "
        "can, e.g. master_name=mymaster, global_keyprefix=app:.",
        group=BROKER,
        parse=parse_options,
        metavar="KEY=VALUE",
        repeat=True,
    )
    broker_ssl_options: dict[str, Any] = option(
        {},
        "TLS option key=value for rediss:// and amqps:// (repeatable), e.g. "
        "ca_certs=/etc/ssl/ca.pem, certfile=..., keyfile=..., cert_reqs=CERT_REQUIRED.",
        group=BROKER,
        parse=parse_options,
        metavar="KEY=VALUE",
        repeat=True,
    )
    events_exchange: str = option(
        "celeryev",
        "Exchange the workers publish events to (Celery's event_exchange).",
        group=EVENTS,
        metavar="NAME",
    )
    event_queue_ttl: float = option(
        5.0,
        "AMQP: seconds an event may wait in the receiving queue (x-message-ttl).",
        group=EVENTS,
        parse=parse_number(0.001),
        metavar="SECONDS",
    )
    event_queue_expires: float = option(
        60.0,
        "AMQP: seconds the receiving queue outlives a lost connection (x-expires).",
        group=EVENTS,
        parse=parse_number(1.0),
        metavar="SECONDS",
    )
    enable_events: bool = option(
        False,
        "Broadcast Celery's enable_events control command, so workers started without "
        "-E send task events.",
        group=EVENTS,
        parse=parse_boolean,
    )
    enable_events_interval: float = option(
        30.0,
        "Seconds between enable_events broadcasts (workers that start later get it too).",
        group=EVENTS,
        parse=parse_number(0.1),
        metavar="SECONDS",
    )
    max_tracked_tasks: int = option(
        100_000,
        "In-flight tasks to remember; the least recently seen are evicted past it.",
        group=TASKS,
        parse=integer(1),
        metavar="N",
    )
    default_queue: str = option(
        "celery",
        "Queue label for tasks whose queue was never seen in a task-sent event.",
        group=TASKS,
        metavar="NAME",
    )
    task_objectives: dict[str, float] = option(
        {},
        "Success objective GLOB=RATIO of the task names matching the glob (repeatable; the "
        "first glob a name matches wins), e.g. 'payments.*=0.999', '*=0.99': exported as "
        "celery_task_objective_ratio for the burn-rate alerts.",
        group=TASKS,
        parse=parse_task_globs(parse_number(0.0, 1.0, exclusive=True)),
        metavar="GLOB=RATIO",
        repeat=True,
    )
    task_expected_intervals: dict[str, float] = option(
        {},
        "Expected seconds between successes GLOB=SECONDS of periodic tasks (repeatable; the "
        "first glob a name matches wins): exported as celery_task_expected_interval_seconds "
        "for CeleryTaskNotSucceededRecently.",
        group=TASKS,
        parse=parse_task_globs(parse_number(0.0, exclusive=True)),
        metavar="GLOB=SECONDS",
        repeat=True,
    )
    worker_timeout: float = option(
        30.0,
        "Seconds without a heartbeat before a worker counts as down.",
        group=WORKERS,
        parse=parse_number(1.0),
        metavar="SECONDS",
    )
    purge_offline_after: float = option(
        86400.0,
        "Seconds a worker that vanished without worker-offline stays down (celery_worker_up "
        "0) before all of its series are removed; workers that said goodbye go after "
        "--worker-timeout.",
        group=WORKERS,
        parse=parse_number(1.0),
        metavar="SECONDS",
    )
    inspect_interval: float = option(
        30.0,
        "Seconds between inspect rounds asking workers for their pool size, prefetch limit "
        "and queues (Celery's stats and active_queues); 0 turns them off.",
        group=WORKERS,
        parse=parse_number(0.0),
        metavar="SECONDS",
    )
    inspect_timeout: float = option(
        2.0,
        "Seconds an inspect round waits for replies.",
        group=WORKERS,
        parse=parse_number(0.1),
        metavar="SECONDS",
    )
    queues: tuple[str, ...] = option(
        (),
        "Queues whose length to probe, comma-separated; queues named by task-sent events "
        "and the default queue are probed too.",
        group=QUEUES,
        parse=parse_text_list,
        metavar="A,B,...",
    )
    queue_poll_interval: float = option(
        15.0,
        "Seconds between queue length probes.",
        group=QUEUES,
        parse=parse_number(0.1),
        metavar="SECONDS",
    )
    queue_probe_timeout: float = option(
        5.0,
        "Seconds one queue probe may take before it counts as failed.",
        group=QUEUES,
        parse=parse_number(0.1),
        metavar="SECONDS",
    )
    runtime_buckets: tuple[float, ...] = option(
        DEFAULT_RUNTIME_BUCKETS,
        "Bucket bounds (seconds) of celery_task_runtime_seconds.",
        group=METRICS,
        parse=parse_buckets,
        metavar="S,S,...",
    )
    wait_buckets: tuple[float, ...] = option(
        DEFAULT_WAIT_BUCKETS,
        "Bucket bounds (seconds) of the queue and prefetch wait histograms.",
        group=METRICS,
        parse=parse_buckets,
        metavar="S,S,...",
    )
    static_labels: dict[str, str] = option(
        {},
        "Constant label key=value added to every series (repeatable).",
        group=METRICS,
        parse=parse_labels,
        metavar="KEY=VALUE",
        repeat=True,
    )
    max_label_values: int = option(
        1000,
        "Distinct values per label (task name, hostname, queue, exception) before new "
        "ones are exported as 'other'.",
        group=METRICS,
        parse=integer(1),
        metavar="N",
    )
    # Fleets: task series without pod names.
    task_hostname_label: str = option(
        hostnames.KEEP,
        "hostname label of task families (celery_task_*): keep, or drop to sum them over "
        "workers at the source; worker families keep it either way.",
        group=METRICS,
        parse=parse_choice(hostnames.KEEP, hostnames.DROP),
        metavar="MODE",
    )
    task_hostname_rewrite: tuple[hostnames.Rewrite, ...] = option(
        (),
        "Rewrite of the hostname label of task families, PATTERN=REPLACEMENT (Python re, "
        r"\1 or \g<name>; repeatable, the first matching rule applies), e.g. "
        r"'^(celery@.+)-[0-9a-f]{8,10}-[0-9a-z]{5}$=\1' folds a Deployment's pods into one.",
        group=METRICS,
        parse=parse_rewrites,
        metavar="PATTERN=REPLACEMENT",
        repeat=True,
    )
    host: str = option("0.0.0.0", "Address to serve HTTP on.", group=HTTP, metavar="ADDRESS")
    port: int = option(
        9808,
        "Port to serve HTTP on (0: any free port).",
        group=HTTP,
        parse=integer(0, 65535),
        metavar="PORT",
    )
    web_config_file: str = option(
        "",
        "Prometheus exporter-toolkit web config (YAML): TLS, client certificates and basic "
        "auth users; re-read when it changes.",
        group=HTTP,
        parse=parse_web_config_file,
        metavar="FILE",
    )
    recent_failures: int = option(
        100,
        "Failures the overview page lists (task, worker, exception and traceback, never "
        "arguments or results); 0 turns the list off.",
        group=HTTP,
        parse=integer(0, 10_000),
        metavar="N",
    )
    flower_metrics: bool = option(
        False,
        "Also serve Flower 2.x's metric families (flower_events_total, ...) under Flower's "
        "names and labels, for dashboards and checks made for Flower's /metrics.",
        group=METRICS,
        parse=parse_boolean,
    )
    recent_tasks: int = option(
        10_000,
        "Finished tasks the overview page and /api/v1/tasks can look up, besides those in "
        "flight (never arguments or results); 0 turns lookups off.",
        group=HTTP,
        parse=integer(0, 100_000),
        metavar="N",
    )
    otlp_traces: bool = option(
        False,
        "Export OpenTelemetry spans of tasks (a publish, each execution) over OTLP, "
        "configured by the standard OTEL_EXPORTER_OTLP_* variables (needs the 'tracing' extra).",
        group=TRACING,
        parse=parse_boolean,
    )
    trace_sample_ratio: float = option(
        1.0,
        "Share of workflows traced, chosen by root task id so a workflow is kept or dropped "
        "whole; OTEL_TRACES_SAMPLER instead, when set.",
        group=TRACING,
        parse=parse_number(0.0, 1.0),
        metavar="RATIO",
    )
    log_level: str = option(
        "info",
        "Log level.",
        group=LOGS,
        parse=parse_choice("debug", "info", "warning", "error"),
        metavar="LEVEL",
    )
    log_format: str = option(
        "text",
        "Log format: text, or json (one object per line).",
        group=LOGS,
        parse=parse_choice("text", "json"),
        metavar="FORMAT",
    )
    demo: bool = option(
        False,
        "Run a demo cluster (a real Celery worker on a temporary "
        "filesystem broker, and a client sending tasks) and export it.",
        group=RUN,
        parse=parse_boolean,
    )

    @classmethod
    def options(cls) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(cls)

    def masked_broker_url(self) -> str:
        return mask_url(self.broker_url)


def mask_url(url: str) -> str:
    """The URL with any password replaced, for logs and pages."""
    masked = []
    for part in url.split(";"):
        scheme, sep, rest = part.partition("://")
        userinfo, at, hostpart = rest.rpartition("@")
        if sep and at and ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            part = f"{scheme}://{user}:****@{hostpart}"
        masked.append(part)
    return ";".join(masked)


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    """``--static-label`` for ``static_labels``: a repeatable flag names one item."""
    flag = "--" + name.replace("_", "-")
    return flag.removesuffix("s") if Config.__dataclass_fields__[name].metadata["repeat"] else flag


class CommandLineParser(argparse.ArgumentParser):
    """Reports a usage mistake as one line, like every other configuration error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


COMMANDS = {
    "events": "prints the events as they arrive",
    "check": "listens a few seconds and tells what the metrics would miss",
}
"""Commands besides the daemon, for its --help (``cli`` runs them)."""


def build_parser() -> argparse.ArgumentParser:
    usage = "".join(f"\n       %(prog)s {name} [OPTIONS]" for name in COMMANDS)
    parser = CommandLineParser(
        prog=PROG,
        usage=f"%(prog)s [OPTIONS]{usage}",
        description="Export Celery's event stream as Prometheus metrics. Commands: "
        + "; ".join(f"{name} {summary}" for name, summary in COMMANDS.items())
        + " (each has its own --help).",
        epilog=f"Every option can also be set as an environment variable {ENV_PREFIX}<OPTION> "
        "(e.g. CELERY_EXPORTER_BROKER_URL) or as a key of the --config file (e.g. broker_url). "
        "Precedence: flags, then environment, then file, then defaults.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_options(parser)
    return parser


def add_options(parser: argparse.ArgumentParser, names: Collection[str] | None = None) -> None:
    """``--config`` and the flags of the named options (all by default), grouped by purpose."""
    parser.add_argument(
        "--config", metavar="FILE", help=f"YAML file of options (also {ENV_PREFIX}CONFIG)."
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for spec in Config.options():
        if names is not None and spec.name not in names:
            continue
        meta = spec.metadata
        group = groups.get(meta["group"])
        if group is None:
            group = groups[meta["group"]] = parser.add_argument_group(meta["group"])
        default = spec.default_factory() if spec.default is dataclasses.MISSING else spec.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = meta["help"] + (f" [default: {shown}]" if shown not in ("", {}) else "")
        help_text = help_text.replace("%", "%%")
        if meta["parse"] is parse_boolean:
            group.add_argument(
                flag_name(spec.name),
                dest=spec.name,
                help=help_text,
                action=argparse.BooleanOptionalAction,
            )
        else:
            group.add_argument(
                flag_name(spec.name),
                dest=spec.name,
                help=help_text,
                metavar=meta["metavar"],
                action="append" if meta["repeat"] else "store",
            )


def load(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """The configuration from flags, environment and file; ``ConfigError`` on any mistake."""
    return resolve(vars(build_parser().parse_args(argv)), environ)


def resolve(
    cli: dict[str, Any], environ: Mapping[str, str] | None = None, *, demo: bool = True
) -> Config:
    """The configuration from parsed flags (``add_options``' names; others are ignored),
    environment and file. Without ``demo``, a broker URL is required whatever it says."""
    environ = os.environ if environ is None else environ
    known = {spec.name: spec for spec in Config.options()}

    env = {}
    for variable, value in environ.items():
        if not variable.startswith(ENV_PREFIX):
            continue
        name = variable[len(ENV_PREFIX) :].lower()
        if name != "config" and name not in known:
            raise ConfigError(f"unknown environment variable {variable}{_suggest(name, known)}")
        env[name] = value

    path = cli.pop("config", None) or env.pop("config", None)
    file_values = _read_file(path, known) if path else {}

    values = {}
    for name, spec in known.items():
        for source, layer in ((flag_name(name), cli), (env_name(name), env), (path, file_values)):
            if name in layer:
                try:
                    values[name] = spec.metadata["parse"](layer[name])
                except ValueError as exc:
                    raise ConfigError(f"{name}: {exc} (from {source})") from None
                break
    config = Config(**values)
    if not config.broker_url and not (demo and config.demo):
        raise ConfigError(
            f"broker_url: required: set {flag_name('broker_url')}, "
            f"{env_name('broker_url')} or broker_url in --config"
            + (" (or use --demo)" if demo else "")
        )
    if config.broker_url:
        _check_broker_url(config.broker_url)
    return config


def _read_file(path: str, known: Mapping[str, Any]) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as stream:
            data = yaml.safe_load(stream)
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise ConfigError(f"config: {path} is not valid YAML{line}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of option: value")
    for key in data:
        if key not in known:
            raise ConfigError(f"{key}: unknown key in {path}{_suggest(str(key), known)}")
    return data


def _suggest(name: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _check_broker_url(url: str) -> None:
    """What kombu would find wrong with the URL only when connecting, as one line now."""
    from kombu.transport import get_transport_cls
    from kombu.utils.url import url_to_parts

    for part in url.split(";"):
        shown = mask_url(part.strip())
        scheme, sep, _ = part.strip().partition("://")
        if not sep or not scheme:
            raise ConfigError(f"broker_url: {shown!r} is not a URL (scheme://host...)")
        try:
            get_transport_cls(scheme)
        except KeyError:
            raise ConfigError(f"broker_url: unknown transport {scheme!r} in {shown}") from None
        except ImportError as exc:
            raise ConfigError(
                f"broker_url: the {scheme} transport needs a package not installed ({exc})"
            ) from None
        try:
            parts = url_to_parts(part.strip())
        except ValueError as exc:
            raise ConfigError(f"broker_url: {shown}: {exc}") from None
        database = (parts.path or "0").strip("/") or "0"
        if scheme in ("redis", "rediss") and not database.isdigit():
            raise ConfigError(f"broker_url: {shown}: a Redis database is a number")
