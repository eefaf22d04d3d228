"""Celery event traffic, encoded exactly as kombu puts it on the Redis wire.

Events carry the fields Celery 5 sends (``celery/worker/strategy.py``,
``celery/worker/request.py``, ``celery/worker/heartbeat.py``), with the
dispatcher's ``hostname``, ``utcoffset``, ``pid`` and ``clock`` first, as
``EventDispatcher`` builds them. Bodies are ``json.dumps`` output; the
envelope is kombu's Redis message with the body in base64, published to
``/0.celeryev/<routing key>``. Encoding goes through templates made by
``json.dumps`` itself, so the bytes are identical and cheap to produce.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

EXCHANGE = "celeryev"
CHANNEL_PREFIX = f"/0.{EXCHANGE}/"
BATCH_LIMIT = 24
"""Prefork workers buffer task events and flush them as one ``task.multi`` list."""
HEARTBEAT_SECONDS = 2.0
FAIL_RATE = 0.03
RETRY_RATE = 0.02
SW_INFO = {"sw_ident": "py-celery", "sw_ver": "5.7.0", "sw_sys": "Linux"}


def _slot(key: str) -> str:
    return f"\x01{key}\x01"


class Template:
    """``json.dumps(example)`` with the values of ``slots`` left open.

    Slot values are passed already JSON-encoded, so ``render`` returns what
    ``json.dumps`` would have returned for the filled-in dict.
    """

    def __init__(self, example: dict[str, Any], slots: tuple[str, ...]) -> None:
        text = json.dumps(_open(example, slots))
        text = text.replace("%", "%%")
        for key in slots:
            text = text.replace(json.dumps(_slot(key)), f"%({key})s")
        self.text = text

    def render(self, **values: str) -> str:
        return self.text % values


def _open(value: Any, slots: tuple[str, ...]) -> Any:
    """``value`` with the values of the keys in ``slots`` replaced by markers, at any depth."""
    if isinstance(value, dict):
        return {k: _slot(k) if k in slots else _open(v, slots) for k, v in value.items()}
    return value


def _dispatcher_fields(type_: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Field order of ``EventDispatcher._prepare_event`` + ``Event``."""
    return {
        "hostname": None,
        "utcoffset": 0,
        "pid": None,
        "clock": None,
        **fields,
        "timestamp": None,
        "type": type_,
    }


COMMON = ("hostname", "pid", "clock", "timestamp")
EVENTS: dict[str, Template] = {
    "task-received": Template(_dispatcher_fields("task-received", {
        "uuid": None, "name": None, "args": "(2, 2)", "kwargs": "{}", "root_id": None,
        "parent_id": None, "retries": None, "eta": None, "expires": None,
    }), (*COMMON, "uuid", "name", "root_id", "retries")),
    "task-started": Template(_dispatcher_fields("task-started", {"uuid": None}),
                             (*COMMON, "uuid")),
    "task-succeeded": Template(_dispatcher_fields("task-succeeded", {
        "uuid": None, "result": "4", "runtime": None,
    }), (*COMMON, "uuid", "runtime")),
    "task-failed": Template(_dispatcher_fields("task-failed", {
        "uuid": None, "exception": "ValueError('boom')",
        "traceback": 'Traceback (most recent call last):\n  File "tasks.py", line 12, in fail\n'
                     "    raise ValueError('boom')\nValueError: boom\n",
    }), (*COMMON, "uuid")),
    "task-retried": Template(_dispatcher_fields("task-retried", {
        "uuid": None, "exception": "ConnectionError('reset')",
        "traceback": "Traceback (most recent call last):\nConnectionError: reset\n",
    }), (*COMMON, "uuid")),
    "worker-online": Template(_dispatcher_fields("worker-online", {
        "freq": HEARTBEAT_SECONDS, "active": 0, "processed": 0, "loadavg": [0.5, 0.4, 0.3],
        **SW_INFO,
    }), COMMON),
    "worker-heartbeat": Template(_dispatcher_fields("worker-heartbeat", {
        "freq": HEARTBEAT_SECONDS, "active": None, "processed": None,
        "loadavg": [0.5, 0.4, 0.3], **SW_INFO,
    }), (*COMMON, "active", "processed")),
}  # fmt: skip

ENVELOPE = Template({
    "body": None, "content-encoding": "utf-8", "content-type": "application/json",
    "headers": {"hostname": None},
    "properties": {"delivery_mode": 1,
                   "delivery_info": {"exchange": EXCHANGE, "routing_key": None},
                   "priority": 0, "body_encoding": "base64", "delivery_tag": None},
}, ("body", "hostname", "routing_key", "delivery_tag"))  # fmt: skip


def envelope(body: str, hostname: str, routing_key: str, tag: str) -> bytes:
    """kombu's Redis message around a JSON body."""
    encoded = base64.b64encode(body.encode()).decode()
    return ENVELOPE.render(
        body=f'"{encoded}"',
        hostname=json.dumps(hostname),
        routing_key=f'"{routing_key}"',
        delivery_tag=f'"{tag}"',
    ).encode()


@dataclass
class Message:
    """One broker message: the channel it goes to and how many events it holds."""

    channel: str
    """The pub/sub channel on Redis, the routing key on AMQP."""
    data: bytes
    events: int
    at: float
    """Planned send time, seconds from the start of the stream."""


class Worker:
    """A worker's dispatcher state: its Lamport clock and its tasks in flight."""

    def __init__(self, hostname: str, pid: int) -> None:
        self.hostname = hostname
        self.json_hostname = json.dumps(hostname)
        self.pid = str(pid)
        self.clock = 0
        self.processed = 0
        self.prefetched: list[tuple[str, str, int]] = []
        self.active: list[tuple[str, str, int]] = []

    def event(self, type_: str, timestamp: float, **values: str) -> str:
        self.clock += 1
        return EVENTS[type_].render(
            hostname=self.json_hostname,
            pid=self.pid,
            clock=str(self.clock),
            timestamp=repr(timestamp),
            **values,
        )


class Traffic:
    """A deterministic stream of task lifecycles and heartbeats over many workers.

    Each worker in turn receives a new task, starts the one it received
    before and finishes the one before that (a few per cent fail, some are
    retried and come back as a new ``task-received``), so every worker has
    tasks prefetched and active as a real one does.
    """

    def __init__(
        self, *, workers: int, names: int, seed: int = 1, start: float = 0.0, amqp: bool = False
    ) -> None:
        """``amqp``: messages are bare bodies for their routing key, as Celery sends on AMQP;
        else kombu's Redis envelope for the pub/sub channel."""
        self.amqp = amqp
        self.random = random.Random(seed)
        self.workers = [Worker(f"celery@bench-{i:04d}", 1000 + i) for i in range(workers)]
        self.names = [json.dumps(f"bench.tasks.task_{i:03d}") for i in range(names)]
        self.start = start
        self._tag = f"{self.random.getrandbits(32):08x}-{self.random.getrandbits(16):04x}-4"
        self._serial = 0
        self._retries: list[tuple[str, str, int]] = []

    def _uuid(self) -> str:
        self._serial += 1
        serial = self._serial
        return f"{self._tag}{serial >> 48 & 0xFFF:03x}-8000-{serial & 0xFFFFFFFFFFFF:012x}"

    def _message(
        self, worker: Worker, routing_key: str, body: str, events: int, at: float
    ) -> Message:
        if self.amqp:
            return Message(routing_key, body.encode(), events, at)
        return Message(
            CHANNEL_PREFIX + routing_key,
            envelope(body, worker.hostname, routing_key, self._uuid()),
            events,
            at,
        )

    def _new_task(self) -> tuple[str, str, int]:
        if self._retries and self.random.random() < 0.5:
            uuid, name, retries = self._retries.pop()
            return uuid, name, retries + 1
        return f'"{self._uuid()}"', self.random.choice(self.names), 0

    def _step(self, worker: Worker, at: float) -> list[str]:
        """Three task events of one worker: received, started, finished."""
        events = []
        task = self._new_task()
        worker.prefetched.append(task)
        events.append(
            worker.event(
                "task-received",
                at,
                uuid=task[0],
                name=task[1],
                root_id=task[0],
                retries=str(task[2]),
            )
        )
        if len(worker.prefetched) > 1:
            started = worker.prefetched.pop(0)
            worker.active.append(started)
            events.append(worker.event("task-started", at, uuid=started[0]))
        if len(worker.active) > 1:
            uuid, name, retries = worker.active.pop(0)
            worker.processed += 1
            draw = self.random.random()
            if draw < FAIL_RATE:
                events.append(worker.event("task-failed", at, uuid=uuid))
            elif draw < FAIL_RATE + RETRY_RATE:
                events.append(worker.event("task-retried", at, uuid=uuid))
                self._retries.append((uuid, name, retries))
            else:
                runtime = repr(round(self.random.expovariate(20.0), 6))
                events.append(worker.event("task-succeeded", at, uuid=uuid, runtime=runtime))
        return events

    def heartbeat(self, worker: Worker, at: float, kind: str = "worker-heartbeat") -> Message:
        values = (
            {}
            if kind == "worker-online"
            else {"active": str(len(worker.active)), "processed": str(worker.processed)}
        )
        body = worker.event(kind, self.start + at, **values)
        return self._message(worker, kind.replace("-", "."), body, 1, at)

    def lifecycles(self, rate: float, count: int, *, batched: bool) -> Iterator[Message]:
        """About ``count`` events at ``rate`` a second, heartbeats included."""
        workers, sent = self.workers, 0
        yield from (self.heartbeat(w, 0.0, "worker-online") for w in workers)
        sent += len(workers)
        next_beat = HEARTBEAT_SECONDS
        turn = 0
        while sent < count:
            at = sent / rate
            if at >= next_beat:
                for worker in workers:
                    yield self.heartbeat(worker, at)
                sent += len(workers)
                next_beat += HEARTBEAT_SECONDS
            worker = workers[turn % len(workers)]
            turn += 1
            if batched:
                bodies: list[str] = []
                while len(bodies) + 3 <= BATCH_LIMIT:
                    bodies += self._step(worker, self.start + (sent + len(bodies)) / rate)
                sent += len(bodies)
                yield self._message(
                    worker, "task.multi", f"[{', '.join(bodies)}]", len(bodies), sent / rate
                )
            else:
                for body in self._step(worker, self.start + at):
                    kind = body[body.rindex('"type": "') + 9 : -2]
                    yield self._message(worker, kind.replace("-", "."), body, 1, sent / rate)
                    sent += 1

    def received_only(self, rate: float, tasks: int) -> Iterator[Message]:
        """Heartbeats from every worker, then ``tasks`` task-received that never finish."""
        yield from (self.heartbeat(w, 0.0, "worker-online") for w in self.workers)
        for i in range(tasks):
            worker = self.workers[i % len(self.workers)]
            at = (len(self.workers) + i) / rate
            uuid = f'"{self._uuid()}"'
            body = worker.event(
                "task-received",
                self.start + at,
                uuid=uuid,
                name=self.names[i % len(self.names)],
                root_id=uuid,
                retries="0",
            )
            yield self._message(worker, "task.received", body, 1, at)

    def grid(self, rate: float) -> Iterator[Message]:
        """One succeeded and one failed task for every worker x task name."""
        yield from (self.heartbeat(w, 0.0, "worker-online") for w in self.workers)
        sent = len(self.workers)
        for worker in self.workers:
            for name in self.names:
                for final in ("task-succeeded", "task-failed"):
                    uuid = f'"{self._uuid()}"'
                    at = self.start + sent / rate
                    extra = {"runtime": "0.0123"} if final == "task-succeeded" else {}
                    bodies = [
                        worker.event(
                            "task-received", at, uuid=uuid, name=name, root_id=uuid, retries="0"
                        ),
                        worker.event("task-started", at, uuid=uuid),
                        worker.event(final, at, uuid=uuid, **extra),
                    ]
                    sent += 3
                    yield self._message(
                        worker, "task.multi", f"[{', '.join(bodies)}]", 3, sent / rate
                    )
