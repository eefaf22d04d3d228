"""``check``: listen a few seconds, then say what the metrics would miss and why.

The answers to "my metrics are empty": the broker is out of reach (and the
likely cause of the error); nothing arrives (workers send heartbeats even
without ``-E``, so silence means another broker, vhost, Redis database or
exchange); a worker processes tasks, as its heartbeats' ``processed`` grows,
yet sends no task events (``-E`` is off there); sent events are off; clocks
disagree; events are not JSON. Problems make the exit status 1, notes do not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

from kombu import Connection

from ..config import Config
from ..decode import CONTENT_TYPE
from ..health import Health
from ..probes.queues import probe_class
from .listen import listen, positive, printable

DEFAULT_SECONDS = 10.0
CLOCK_OFFSET_SECONDS = 1.0
"""A worker clock this far from ours skews the wait histograms, which span two clocks."""
MAX_WORKERS = 1000
MAX_QUEUES = 50
"""Queues named by events and probed: enough for any real deployment, bounded for hostile input."""
HEARTBEAT_TYPES = ("worker-online", "worker-heartbeat")

# Likely causes of a connection error, by a fragment of its text.
CAUSES = (
    ("Connection refused", "nothing listens there: a wrong host or port, or the broker is down"),
    ("Name or service not known", "the host name does not resolve"),
    ("Temporary failure in name resolution", "the host name does not resolve"),
    ("timed out", "no answer: a firewall, a wrong host, or a broker too busy to answer"),
    ("vhost", "the vhost does not exist, or the user may not use it"),
    ("ACCESS_REFUSED", "wrong user name or password"),
    ("WRONGPASS", "wrong user name or password"),
    ("NOAUTH", "Redis wants a password: put it in the URL (redis://:password@host/0)"),
    ("invalid password", "wrong password"),
    ("DB index", "the Redis database number is beyond the server's `databases` setting"),
    ("SSL", "TLS: check the scheme (rediss://, amqps://) and --broker-ssl-option"),
    ("certificate", "TLS: check the CA and certificates given with --broker-ssl-option"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seconds",
        type=positive(float),
        default=DEFAULT_SECONDS,
        metavar="SECONDS",
        help=f"how long to listen [default: {DEFAULT_SECONDS:g}]",
    )
    parser.add_argument(
        "--json", action="store_true", default=False, help="the findings as one JSON object"
    )


@dataclass
class Worker:
    """What one worker's events showed while listening."""

    hostname: str
    software: str = ""
    interval: float | None = None  # the heartbeat interval it announces (``freq``)
    heartbeats: list[float] = field(default_factory=list)  # arrival times
    offsets: list[float] = field(default_factory=list)  # arrival minus its timestamp
    first_processed: int | None = None  # the heartbeats' count of tasks processed
    last_processed: int | None = None
    task_events: int = 0
    offline: bool = False

    def processed(self) -> int:
        """Tasks processed while listening, by its heartbeats."""
        if self.first_processed is None or self.last_processed is None:
            return 0
        return self.last_processed - self.first_processed

    def clock_offset(self) -> float | None:
        """Seconds its clock is behind ours (transit time included, a few ms)."""
        return statistics.median(self.offsets) if self.offsets else None


class Observer:
    """The pipeline's tracker for ``check``: tallies what arrives."""

    def __init__(self) -> None:
        self.types: Counter[str] = Counter()
        self.dropped_reasons: Counter[str] = Counter()
        self.drop_examples: dict[str, str] = {}
        self.workers: dict[str, Worker] = {}
        self.queues: set[str] = set()

    def handle(self, event: dict[str, Any], arrival: float) -> None:
        kind = event["type"]
        self.types[kind] += 1
        if kind == "task-sent":  # from a client, not a worker
            queue = event.get("queue")
            if queue and len(self.queues) < MAX_QUEUES:
                self.queues.add(queue[:200])
            return
        worker = self._worker(event["hostname"])
        if worker is None:
            return
        if kind.startswith("task-"):
            worker.task_events += 1
        elif kind in HEARTBEAT_TYPES:
            worker.heartbeats.append(arrival)
            worker.offsets.append(arrival - event["timestamp"])
            processed = event.get("processed")
            if type(processed) is int:
                if worker.first_processed is None:
                    worker.first_processed = processed
                worker.last_processed = processed
            freq = event.get("freq")
            if type(freq) in (int, float):
                worker.interval = freq
            software = " ".join(
                str(event[key]) for key in ("sw_ident", "sw_ver", "sw_sys") if event.get(key)
            )
            worker.software = software[:200] or worker.software
        elif kind == "worker-offline":
            worker.offline = True

    def _worker(self, hostname: str) -> Worker | None:
        worker = self.workers.get(hostname)
        if worker is None and len(self.workers) < MAX_WORKERS:
            worker = self.workers[hostname] = Worker(hostname[:200])
        return worker

    def tick(self, now: float) -> None:
        """Nothing to keep up: the findings are made at the end."""

    def dropped(self, reason: str, detail: str) -> None:
        self.dropped_reasons[reason] += 1
        self.drop_examples.setdefault(reason, detail[:200])


@dataclass
class Findings:
    """The diagnosis: facts for the report, problems (exit 1) and notes."""

    broker: str
    seconds: float
    exchange: str
    reached: bool = False
    error: str = ""
    events: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    workers: list[dict[str, Any]] = field(default_factory=list)
    sent_events: bool | None = None
    queues: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def diagnose(
    config: Config, seconds: float, observer: Observer, health: Health, reached: bool
) -> Findings:
    """What the listening showed, worded for a person who must act on it."""
    found = Findings(health.broker, seconds, config.events_exchange, reached)
    if not reached:
        found.error = health.last_error or "no connection within the time"
        found.problems.append(f"cannot reach the broker: {found.error}{_cause(found.error)}")
        return found
    if not health.connected:
        found.notes.append(f"the connection was lost while listening: {health.last_error}")
    found.events = dict(observer.types.most_common())
    found.dropped = dict(observer.dropped_reasons)
    _check_drops(observer, found)
    if not observer.types and not observer.dropped_reasons:
        found.problems.append(_silence(config, seconds))
        return found
    for worker in sorted(observer.workers.values(), key=lambda w: w.hostname):
        _check_worker(worker, seconds, found)
    _check_sent_events(observer, found)
    return found


def _cause(error: str) -> str:
    for fragment, cause in CAUSES:
        if fragment.lower() in error.lower():
            return f" ({cause})"
    return ""


def _silence(config: Config, seconds: float) -> str:
    """Why nothing at all arrived: workers send heartbeats even without -E."""
    connection = Connection(config.broker_url)
    kind, where = connection.transport.driver_type, connection.virtual_host
    if kind == "redis":  # kombu reads the database number as the virtual host
        where = f"Redis database (this URL reads database {where.strip('/') or 0})"
    elif kind == "amqp":
        where = f"vhost (this URL reads vhost {where!r})"
    else:
        where = "folder or server"
    return (
        f"nothing arrived in {seconds:.0f} s. Workers send a heartbeat every 2 s even without "
        "-E, so none reaches this listener: no worker runs on this broker, or the workers "
        f"use another {where}, or they publish events to another exchange than "
        f"{config.events_exchange!r} (Celery's event_exchange; set --events-exchange)"
        + (", or another global_keyprefix (--broker-transport-option)" if kind == "redis" else "")
    )


def _check_drops(observer: Observer, found: Findings) -> None:
    for reason, count in observer.dropped_reasons.items():
        example = observer.drop_examples[reason]
        if reason == CONTENT_TYPE:
            found.problems.append(
                f"{count} messages dropped as not JSON ({example}): set "
                "event_serializer = 'json' on workers and clients (pickle is never read)"
            )
        else:
            found.problems.append(
                f"{count} messages dropped ({reason}: {example}): something other than "
                "Celery publishes to the event exchange"
            )


def _check_worker(worker: Worker, seconds: float, found: Findings) -> None:
    offset = worker.clock_offset()
    delta = worker.processed()
    gaps = [b - a for a, b in zip(worker.heartbeats, worker.heartbeats[1:], strict=False)]
    found.workers.append(
        {
            "hostname": worker.hostname,
            "software": worker.software,
            "heartbeat_interval_seconds": worker.interval,
            "heartbeats": len(worker.heartbeats),
            "measured_interval_seconds": statistics.median(gaps) if gaps else None,
            "clock_offset_seconds": offset,
            "processed_while_listening": delta,
            "task_events": worker.task_events,
            "offline": worker.offline,
        }
    )
    name = worker.hostname
    if worker.task_events == 0 and delta > 0:
        found.problems.append(
            f"{name} processed {delta} tasks but sent no task events: task events are off "
            "there. Start it with -E (or set worker_send_task_events = True), or run the "
            "exporter with --enable-events"
        )
    elif worker.task_events == 0 and worker.heartbeats:
        found.notes.append(
            f"{name} processed no task while listening: cannot tell whether its task "
            "events (-E) are on; check while it works"
        )
    if not worker.heartbeats and seconds >= 3 * (worker.interval or 2.0):
        found.notes.append(
            f"{name} sends task events but no heartbeat (--without-heartbeat?): the "
            "exporter counts it down"
        )
    if offset is not None and abs(offset) > CLOCK_OFFSET_SECONDS:
        side = "behind" if offset > 0 else "ahead of"
        found.notes.append(
            f"{name}'s clock is {abs(offset):.1f} s {side} this machine's: the queue and "
            "prefetch waits span clocks and are off by as much; synchronise the clocks (NTP)"
        )
    if worker.offline:
        found.notes.append(f"{name} went offline while listening")


def _check_sent_events(observer: Observer, found: Findings) -> None:
    sent, received = observer.types["task-sent"], observer.types["task-received"]
    if sent:
        found.sent_events = True
    elif received:
        found.sent_events = False
        found.notes.append(
            f"sent events are off: workers received {received} tasks, no task-sent arrived. "
            "Without them there is no celery_task_sent_total, no queue wait, and the queue "
            "label is guessed; set task_send_sent_event = True where tasks are sent"
        )


def probe_queues(config: Config, observer: Observer, found: Findings) -> None:
    """The backlog of the queues events named, the configured ones and the default queue."""
    names = sorted({*config.queues, config.default_queue, *observer.queues})
    probe = None
    try:
        probe = probe_class(config.broker_url)(config, config.queue_probe_timeout)
        for name in names:
            try:
                messages, consumers = probe.measure(name)
            except Exception as exc:  # a probe failing is a finding, not the end
                found.queues.append({"name": name, "error": f"{type(exc).__name__}: {exc}"})
                continue
            found.queues.append({"name": name, "messages": messages, "consumers": consumers})
            if messages and consumers == 0:
                found.notes.append(
                    f"queue {name}: {messages} messages wait and no worker consumes it"
                )
    finally:
        if probe is not None:
            probe.close()


def report(found: Findings) -> str:
    """The findings as text for a person."""
    lines = [
        f"broker {found.broker}: " + ("reached" if found.reached else f"NOT reached: {found.error}")
    ]
    if found.reached:
        total = sum(found.events.values())
        kinds = ", ".join(f"{kind} {count}" for kind, count in found.events.items())
        lines.append(
            f"events on exchange {found.exchange!r} in {found.seconds:g} s: {total}"
            + (f" ({kinds})" if kinds else "")
        )
        if found.dropped:
            lines.append("dropped: " + ", ".join(f"{r} {n}" for r, n in found.dropped.items()))
        lines.append(f"workers: {len(found.workers)}")
        lines.extend(f"  {_worker_line(worker)}" for worker in found.workers)
        sent = {True: "on", False: "off", None: "unknown (no task was sent or received)"}
        lines.append(f"sent events: {sent[found.sent_events]}")
        if found.queues:
            lines.append("queues:")
            lines.extend(f"  {_queue_line(queue)}" for queue in found.queues)
    for title, items in (("problems", found.problems), ("notes", found.notes)):
        if items:
            lines.append(f"{title}:")
            lines.extend(f"  - {item}" for item in items)
    count = len(found.problems)
    lines.append(
        "all is well" if not count else f"{count} problem{'' if count == 1 else 's'} found"
    )
    return "\n".join(printable(line) for line in lines)  # hostnames and errors come from afar


def _worker_line(worker: dict[str, Any]) -> str:
    parts = [worker["software"] or "software unknown"]
    if worker["heartbeat_interval_seconds"] is not None:
        parts.append(f"heartbeat every {worker['heartbeat_interval_seconds']:g} s")
    offset = worker["clock_offset_seconds"]
    if offset is not None:
        parts.append(f"clock {abs(offset):.3f} s {'behind' if offset > 0 else 'ahead of'} ours")
    parts.append(f"{worker['processed_while_listening']} tasks processed")
    parts.append(f"{worker['task_events']} task events")
    return f"{worker['hostname']}: " + ", ".join(parts)


def _queue_line(queue: dict[str, Any]) -> str:
    if "error" in queue:
        return f"{queue['name']}: probe failed: {queue['error']}"
    consumers = queue["consumers"]
    who = "" if consumers is None else f", {consumers} consumer{'' if consumers == 1 else 's'}"
    return f"{queue['name']}: {queue['messages']} waiting{who}"


def run(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    observer = Observer()
    reached = threading.Event()

    def unreachable(health: Health) -> bool:
        """The first failed connection is the answer: the check does not wait out retries."""
        if health.connected:
            reached.set()
        return not reached.is_set() and bool(health.last_error)

    started = time.monotonic()
    health = listen(config, observer, threading.Event(), args.seconds, unreachable)
    seconds = min(args.seconds, round(time.monotonic() - started, 1))  # less after Ctrl-C
    found = diagnose(config, seconds, observer, health, reached.is_set() or health.connected)
    if found.reached:
        probe_queues(config, observer, found)
    if args.json:
        out.write(json.dumps({**vars(found), "ok": not found.problems}) + "\n")
    else:
        out.write(report(found) + "\n")
    out.flush()
    return 1 if found.problems else 0
