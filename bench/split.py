"""Where an event's CPU goes, in process: receive, decode, check, track.

The same traffic the publisher sends is run through each stage of the
daemon's per-message path on its own, in this process, so a regression
shows in the stage that caused it:

* receive: on Redis, the pub/sub replies parsed (hiredis) and kombu's
  envelope opened; on RabbitMQ, the deliveries' frames split out of bytes
  read in bulk (``amqp_reader.Frames``);
* decode: the message body to events (``decode.decode_body``);
* check: each event's fields (``decode.check_event``);
* track: each event applied to a fresh tracker, built as the daemon builds it
  from its options (defaults, or ``--exporter-args``), hooks included.

Each stage is timed over the whole stream, best of ``REPEATS`` runs: in
process the noise is another program taking the core, which only slows a run.

    python -m bench.split [--events 200000] [--exporter-args '--task-hostname-label drop']
"""

from __future__ import annotations

import argparse
import json
import shlex
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import hiredis

from exporter.broker.amqp_reader import BODY, HEADER, READ_BYTES, Frames, method_frame
from exporter.config import load
from exporter.daemon import Daemon
from exporter.decode import check_event, decode_body, unwrap_redis_envelope

from .traffic import EXCHANGE, Message, Traffic

REPEATS = 5
RATE = 50_000.0
"""Events a second the stream's timestamps are spaced for (it is not paced here)."""
STAGES = ("receive", "decode", "check", "track")
_PROPERTIES = b"\x10application/json\x05utf-8\x01"  # content type and encoding, transient
_PROPERTY_FLAGS = 0x8000 | 0x4000 | 0x1000


def messages(amqp: bool, batched: bool, events: int) -> list[Message]:
    traffic = Traffic(workers=50, names=20, start=time.time(), amqp=amqp)
    return list(traffic.lifecycles(RATE, events, batched=batched))


def amqp_deliveries(stream: Iterable[Message], channel: int = 1) -> bytes:
    """basic.deliver, content header and body frames, as RabbitMQ writes them to a consumer."""
    frames = []
    for tag, message in enumerate(stream, 1):
        key = message.channel.encode()
        arguments = (
            b"\x08consumer"
            + struct.pack(">Q?", tag, False)
            + bytes((len(EXCHANGE),))
            + EXCHANGE.encode()
            + bytes((len(key),))
            + key
        )
        frames.append(method_frame(channel, (60, 60), arguments))
        header = struct.pack(">HHQH", 60, 0, len(message.data), _PROPERTY_FLAGS) + _PROPERTIES
        frames.append(struct.pack(">BHI", HEADER, channel, len(header)) + header + b"\xce")
        frames.append(
            struct.pack(">BHI", BODY, channel, len(message.data)) + message.data + b"\xce"
        )
    return b"".join(frames)


class _Bodies:
    """A sink that only keeps what the receive stage hands on."""

    def __init__(self) -> None:
        self.bodies: list[tuple[bytes, str | None]] = []

    def on_body(self, body: bytes, content_type: str | None, arrival: float) -> None:
        self.bodies.append((body, content_type))

    def on_unreadable(self, detail: str, reason: str = "") -> None:
        raise AssertionError(f"the bench's own frames are unreadable: {detail}")


def _amqp_receive(wire: bytes) -> Callable[[], list[tuple[bytes, str | None]]]:
    source = memoryview(wire)

    def receive() -> list[tuple[bytes, str | None]]:
        """As the reader's loop: each read fills the buffer's room, frames are split."""
        sink = _Bodies()
        frames = Frames(sink, 1, 131072, _no_method)  # type: ignore[arg-type]
        at = 0
        while at < len(wire):
            room = frames.room()
            size = min(len(room), READ_BYTES, len(wire) - at)
            room[:size] = source[at : at + size]
            frames.filled(size, 0.0)
            at += size
        return sink.bodies

    return receive


def _no_method(channel: int, ids: tuple[int, int], arguments: bytes) -> None:
    raise AssertionError(f"an unexpected method {ids}")


def _redis_receive(wire: bytes) -> Callable[[], list[tuple[bytes, str | None]]]:
    chunk = READ_BYTES

    def receive() -> list[tuple[bytes, str | None]]:
        reader = hiredis.Reader()
        bodies = []
        for at in range(0, len(wire), chunk):
            reader.feed(wire[at : at + chunk])
            reply = reader.gets()
            while reply is not False:
                bodies.append(unwrap_redis_envelope(reply[3]))
                reply = reader.gets()
        return bodies

    return receive


def _best(run: Callable[[], Any]) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(REPEATS):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best, result


def split(amqp: bool, batched: bool, events: int, argv: Sequence[str] = ()) -> dict[str, float]:
    """µs an event spent in each stage, for one broker and batching; ``argv``: the
    exporter's options, for the tracker."""
    stream = messages(amqp, batched, events)
    if amqp:
        receive = _amqp_receive(amqp_deliveries(stream))
    else:
        # The pattern subscription's reply to each PUBLISH: pmessage, pattern, channel, data.
        receive = _redis_receive(b"".join(_pmessage(message) for message in stream))
    count = sum(message.events for message in stream)
    seconds: dict[str, float] = {}
    seconds["receive"], bodies = _best(receive)
    seconds["decode"], decoded = _best(
        lambda: [event for body, kind in bodies for event in decode_body(body, kind)]
    )
    seconds["check"], reasons = _best(lambda: [check_event(event) for event in decoded])
    assert not any(reasons), "the bench's own events are invalid"

    options = load(["--broker-url", "redis://127.0.0.1:1/0", *argv], environ={})
    trackers = [Daemon.build(options).tracker for _ in range(REPEATS)]  # built untimed

    def track() -> None:
        handle, arrival = trackers.pop().handle, time.time()
        for event in decoded:
            handle(event, arrival)

    seconds["track"], _ = _best(track)
    assert len(decoded) == count, (len(decoded), count)
    result = {stage: round(seconds[stage] / count * 1e6, 2) for stage in STAGES}
    result["total"] = round(sum(result[stage] for stage in STAGES), 2)
    return result


def _pmessage(message: Message) -> bytes:
    pattern = b"/0.celeryev/*"
    channel = message.channel.encode()
    parts = (b"pmessage", pattern, channel, message.data)
    return b"*4\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)


def figures(events: int, argv: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """The split for each broker and batching mode."""
    return {
        f"{broker}_{mode}": split(broker == "rabbitmq", mode == "batched", events, argv)
        for broker in ("redis", "rabbitmq")
        for mode in ("unbatched", "batched")
    }


def table(split_figures: dict[str, dict[str, float]]) -> str:
    rows = [
        "| µs an event, in process | " + " | ".join(STAGES) + " | total |",
        "|---|" + "---|" * (len(STAGES) + 1),
    ]
    for key, values in split_figures.items():
        broker, _, mode = key.partition("_")
        cells = " | ".join(f"{values[stage]:g}" for stage in (*STAGES, "total"))
        rows.append(f"| {'Redis' if broker == 'redis' else 'RabbitMQ'}, {mode} | {cells} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.split", description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--exporter-args", default="", help="the exporter's options for the tracker, as one string"
    )
    args = parser.parse_args(argv)
    result = figures(args.events, shlex.split(args.exporter_args))
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
