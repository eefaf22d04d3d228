"""The traffic publisher: a process of its own that is never the bottleneck.

The whole stream is encoded before the first byte is sent (Redis protocol
included), with event timestamps set to the planned send times; during the
traffic window the publisher only writes prepared buffers to a socket every
few milliseconds, so its cost and its pace do not depend on the encoding.

    python -m bench.publisher --port 6379 --rate 60000 --seconds 10 [--batched]

prints one JSON line: events and messages published, the time it took, and
the deliveries Redis reported (PUBLISH replies: subscribers reached).

With ``--broker rabbitmq`` py-amqp opens the connection and a channel, and the
prepared stream is basic.publish frames written straight to its socket: py-amqp's
``basic_publish`` costs tens of µs a message, more than the subject spends on one.
A final synchronous call on the same channel returns once the broker has routed
every message before it.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator

import amqp

from exporter.broker.amqp_reader import BODY, FRAME_END, HEADER, method_frame

from .traffic import EXCHANGE, Message, Traffic

SLICE_SECONDS = 0.005


def resp_publish(message: Message) -> bytes:
    channel = message.channel.encode()
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(channel),
        channel,
        len(message.data),
        message.data,
    )


_PUBLISH_PREFIX = struct.pack(">H", 0) + bytes((len(EXCHANGE),)) + EXCHANGE.encode()
_PROPERTIES = b"\x10application/json\x05utf-8\x01"  # content type and encoding, transient
_PROPERTY_FLAGS = 0x8000 | 0x4000 | 0x1000
FRAME_MAX = 131072
"""RabbitMQ's default, which py-amqp accepts: bodies are cut into frames this long."""


def amqp_publish(message: Message, channel: int = 1) -> bytes:
    """basic.publish, content header and body frames, as py-amqp would write them."""
    key = message.channel.encode()
    method = method_frame(channel, (60, 40), _PUBLISH_PREFIX + bytes((len(key),)) + key + b"\0")
    body = message.data
    header = struct.pack(">HHQH", 60, 0, len(body), _PROPERTY_FLAGS) + _PROPERTIES
    frames = [method, _frame(HEADER, channel, header)]
    step = FRAME_MAX - 8
    frames += [_frame(BODY, channel, body[at : at + step]) for at in range(0, len(body), step)]
    return b"".join(frames)


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + bytes((FRAME_END,))


def stream(args: argparse.Namespace, start: float) -> Iterator[Message]:
    traffic = Traffic(
        workers=args.workers,
        names=args.names,
        seed=args.seed,
        start=start,
        amqp=args.broker == "rabbitmq",
    )
    if args.mode == "lifecycles":
        return traffic.lifecycles(args.rate, int(args.rate * args.seconds), batched=args.batched)
    if args.mode == "received":
        return traffic.received_only(args.rate, args.tasks)
    return traffic.grid(args.rate)


def prepare(args: argparse.Namespace, start: float) -> tuple[list[tuple[float, bytes]], int, int]:
    """The stream as (send time, protocol bytes) slices, and its event and message counts."""
    slices: list[tuple[float, bytes]] = []
    pending: list[bytes] = []
    slice_end = SLICE_SECONDS
    events = messages = 0
    encode = amqp_publish if args.broker == "rabbitmq" else resp_publish
    for message in stream(args, start):
        if message.at >= slice_end and pending:
            slices.append((slice_end - SLICE_SECONDS, b"".join(pending)))
            pending = []
            slice_end = (message.at // SLICE_SECONDS + 1) * SLICE_SECONDS
        pending.append(encode(message))
        events += message.events
        messages += 1
    if pending:
        slices.append((slice_end - SLICE_SECONDS, b"".join(pending)))
    return slices, events, messages


class Replies(threading.Thread):
    """Reads PUBLISH replies (``:<subscribers>``) and sums them."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.count = 0
        self.deliveries = 0
        self.error = ""

    def run(self) -> None:
        rest = b""
        while True:
            data = self.sock.recv(1 << 16)
            if not data:
                return
            lines = (rest + data).split(b"\r\n")
            rest = lines.pop()
            for line in lines:
                if line.startswith(b":"):
                    self.deliveries += int(line[1:])
                else:
                    self.error = line.decode(errors="replace")
                self.count += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.publisher")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--broker", choices=("redis", "rabbitmq"), default="redis")
    parser.add_argument("--mode", choices=("lifecycles", "received", "grid"), default="lifecycles")
    parser.add_argument("--rate", type=float, required=True, help="events a second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batched", action="store_true")
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--names", type=int, default=20)
    parser.add_argument("--tasks", type=int, default=100_000, help="for --mode received")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    # Timestamps are planned send times, so the start must be known before
    # encoding: time a small sample of the same stream and add a margin.
    began = time.monotonic()
    sample = Traffic(workers=args.workers, names=args.names, seed=args.seed)
    probe = sample.lifecycles(1e6, 3000, batched=args.batched)
    probe_events = sum(message.events for message in probe)
    per_event = (time.monotonic() - began) / probe_events
    expected = args.rate * args.seconds if args.mode == "lifecycles" else args.tasks
    start = time.time() + 1.5 * per_event * expected + 0.5
    slices, events, messages = prepare(args, start)

    if args.broker == "rabbitmq":
        connection = amqp.Connection(
            f"{args.host}:{args.port}",
            userid="guest",
            password="guest",
            frame_max=FRAME_MAX,
            # py-amqp's 1 s TCP_USER_TIMEOUT would end the connection whenever RabbitMQ's
            # flow control holds the publisher back that long.
            socket_settings={socket.TCP_USER_TIMEOUT: 0},
        )
        connection.connect()
        channel = connection.channel()
        sock = connection.transport.sock
    else:
        sock = socket.create_connection((args.host, args.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        replies = Replies(sock)
        replies.start()
    overrun = time.time() - start
    time.sleep(max(0.0, -overrun))
    t0 = time.monotonic()
    late = 0.0
    for at, chunk in slices:
        wait = t0 + at - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        else:
            late = max(late, -wait)
        sock.sendall(chunk)
    sent_in = time.monotonic() - t0
    if args.broker == "rabbitmq":
        # Answered on the same channel, so after every publish before it was routed.
        channel.exchange_declare(EXCHANGE, "topic", passive=True)
        connection.close()
        deliveries, error = None, ""  # unknown without publisher confirms
    else:
        deadline = time.monotonic() + 30
        while replies.count < messages and time.monotonic() < deadline and not replies.error:
            time.sleep(0.01)
        sock.close()
        deliveries, error = replies.deliveries, replies.error
    print(
        json.dumps(
            {
                "events": events,
                "messages": messages,
                "seconds": round(sent_in, 3),
                "rate": round(events / sent_in, 1) if sent_in else None,
                "max_late_seconds": round(late, 4),
                "start_delay_seconds": round(max(0.0, overrun), 4),
                "deliveries": deliveries,
                "error": error,
            }
        )
    )
    return 0 if not error else 1


if __name__ == "__main__":
    sys.exit(main())
