"""The lean AMQP reader: its frame splitter on byte streams, then real RabbitMQ nodes.

The splitter is fed streams of frames as RabbitMQ sends them, cut at every
offset, and broken ones; the rest runs a private node configured the way a
test needs it (TLS, a short heartbeat, a small frame_max).
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from exporter.amqp_reader import (
    BODY,
    CONNECTION_BLOCKED,
    FRAME_END,
    HEADER,
    HEARTBEAT_FRAME,
    METHOD,
    READ_BYTES,
    Frames,
    ProtocolError,
    method_frame,
)
from exporter.decode import MAX_BODY_BYTES, TOO_LARGE

CHANNEL = 1
JSON = "application/json"


def frame(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + bytes((FRAME_END,))


def short(text: bytes) -> bytes:
    return bytes((len(text),)) + text


def delivery(
    body: bytes,
    content_type: str | None = JSON,
    *,
    frame_max: int = 131072,
    channel: int = CHANNEL,
    tag: int = 1,
) -> bytes:
    """basic.deliver, its content header and body frames, laid out as RabbitMQ sends them."""
    deliver = method_frame(
        channel,
        (60, 60),
        short(b"amq.ctag-exporter") + struct.pack(">QB", tag, 0) + short(b"celeryev")
        + short(b"task.multi"),
    )  # fmt: skip
    flags, properties = 0x1000, b"\x02"  # delivery mode, always set by Celery
    if content_type is not None:
        flags |= 0x8000 | 0x4000
        properties = short(content_type.encode()) + short(b"utf-8") + properties
    header = frame(HEADER, channel, struct.pack(">HHQH", 60, 0, len(body), flags) + properties)
    step = frame_max - 8
    bodies = b"".join(
        frame(BODY, channel, body[at : at + step]) for at in range(0, len(body), step)
    )
    return deliver + header + bodies


class Collect:
    """A sink keeping what the splitter hands on."""

    def __init__(self) -> None:
        self.bodies: list[tuple[bytes, str | None]] = []
        self.unreadable: list[str] = []

    def on_body(self, body: bytes, content_type: str | None, arrival: float) -> None:
        assert type(body) is bytes
        self.bodies.append((body, content_type))

    def on_unreadable(self, detail: str, reason: str = "malformed") -> None:
        self.unreadable.append(reason)

    def on_envelope(self, data: bytes, arrival: float) -> None:
        raise AssertionError("no envelopes on AMQP")

    def on_idle(self, now: float) -> None:
        pass


def splitter(frame_max: int = 131072) -> tuple[Frames, Collect, list[Any]]:
    sink, methods = Collect(), []
    frames = Frames(sink, CHANNEL, frame_max, lambda *method: methods.append(method))
    return frames, sink, methods


def body_of(size: int, seed: int = 0) -> bytes:
    return bytes((seed + i) % 251 for i in range(size))


FRAME_MAX = 4096
STREAM = [
    (b'{"type": "worker-heartbeat"}', JSON),
    (body_of(3 * FRAME_MAX + 17, 1), JSON),  # four body frames
    (b"", JSON),  # no body frame at all
    (body_of(FRAME_MAX - 8, 2), "application/x-msgpack"),  # exactly one full frame
    (b"raw", None),  # no content type property
    (body_of(FRAME_MAX - 7, 3), JSON),  # one octet into a second frame
]


def stream_bytes() -> bytes:
    parts = []
    for number, (body, content_type) in enumerate(STREAM):
        parts.append(delivery(body, content_type, frame_max=FRAME_MAX, tag=number + 1))
        if number == 2:
            parts.append(HEARTBEAT_FRAME)
            parts.append(method_frame(0, CONNECTION_BLOCKED, short(b"low on memory")))
    return b"".join(parts)


def test_a_stream_cut_at_every_offset_yields_every_body_once() -> None:
    data = stream_bytes()
    for cut in range(len(data) + 1):
        frames, sink, methods = splitter(FRAME_MAX)
        frames.feed(data[:cut], 0.0)
        frames.feed(data[cut:], 0.0)
        assert sink.bodies == STREAM, f"cut at {cut}"
        assert methods == [(0, CONNECTION_BLOCKED, short(b"low on memory"))]
        assert (frames.start, frames.end) == (0, 0)


def test_a_stream_read_an_octet_at_a_time() -> None:
    frames, sink, _ = splitter(FRAME_MAX)
    for octet in stream_bytes():
        frames.feed(bytes((octet,)), 0.0)
    assert sink.bodies == STREAM


def test_the_buffer_never_grows() -> None:
    """Megabytes through a buffer of one frame and two reads, a partial frame kept at most."""
    frames, sink, _ = splitter(FRAME_MAX)
    size = len(frames.data)
    chunk = stream_bytes() * 20
    for _ in range(20):
        frames.feed(chunk, 0.0)
        assert len(frames.data) == size == FRAME_MAX + 2 * READ_BYTES + 4
    assert len(sink.bodies) == 20 * 20 * len(STREAM)


def test_a_body_too_large_is_counted_and_never_stored() -> None:
    frames, sink, _ = splitter()
    frames.feed(delivery(b"x" * (MAX_BODY_BYTES + 1)), 0.0)
    frames.feed(delivery(b"{}"), 0.0)
    assert sink.unreadable == [TOO_LARGE]
    assert sink.bodies == [(b"{}", JSON)]


def test_content_types_change_from_one_delivery_to_the_next() -> None:
    frames, sink, _ = splitter()
    sent = [(b"1", JSON), (b"2", "application/x-python-serialize"), (b"3", JSON), (b"4", None)]
    frames.feed(b"".join(delivery(body, kind) for body, kind in sent), 0.0)
    assert sink.bodies == sent


GOOD = delivery(b"{}")
GOOD_BODY = frame(BODY, CHANNEL, b"{}")
AFTER_METHOD = 8 + struct.unpack_from(">I", GOOD, 3)[0]
BROKEN = {
    "unknown frame type": frame(5, 0, b""),
    "frame past frame_max": struct.pack(">BHI", BODY, CHANNEL, 131072),
    "missing frame-end": GOOD[:-1] + b"\x00",
    "delivery on an unknown channel": delivery(b"{}", channel=2),
    "header without a delivery": GOOD[AFTER_METHOD:],
    "body without a header": frame(BODY, CHANNEL, b"{}"),
    "method inside a delivery": GOOD[: -len(GOOD_BODY)] + GOOD,
    "body longer than its header said": GOOD[: -len(GOOD_BODY)] + frame(BODY, CHANNEL, b"{}}"),
    "short method frame": frame(METHOD, 0, b"\x00"),
    "short content header": method_frame(CHANNEL, (60, 60)) + frame(HEADER, CHANNEL, b"\x00"),
}


@pytest.mark.parametrize("stream", BROKEN.values(), ids=BROKEN.keys())
def test_broken_framing_is_a_protocol_error(stream: bytes) -> None:
    frames, sink, _ = splitter()
    with pytest.raises(ProtocolError):
        frames.feed(GOOD + stream + GOOD, 0.0)
    assert sink.bodies == [(b"{}", JSON)]
