"""The RabbitMQ event stream read straight off the AMQP socket.

kombu's consumer and py-amqp build Python objects for each of a message's
three frames (method, header, body), ~50 µs a message before any work. Here
py-amqp only connects, authenticates, negotiates and starts the consumer,
through kombu, so URL, TLS and transport options and the queue declaration are
exactly the kombu receiver's. From then on the socket is ours: it is read in
bulk into one preallocated buffer, and each delivery's body is cut out of it
with ``struct``, a few µs a message. Heartbeats go out on time however busy
the stream is, and a broker silent for two heartbeat intervals is a lost
connection. A broker that breaks the framing is counted as a ``protocol``
error and reconnected to; no buffer grows past one frame and one body.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable

from ..decode import MAX_BODY_BYTES, TOO_LARGE
from .receiver import POLL_SECONDS, KombuReceiver, Sink

log = logging.getLogger(__name__)

SCHEMES = ("amqp", "amqps", "pyamqp")
READ_BYTES = 1 << 16
"""Room for at least this much in each recv_into(): hundreds of small deliveries."""
PROTOCOL = "protocol"
"""The celery_exporter_events_invalid_total reason for a broker breaking AMQP framing."""
FRAME_LIMIT = 4 << 20
"""The largest frame buffered, whatever frame_max the broker asks for (RabbitMQ: 128 KiB)."""
CLOSE_SECONDS = 0.5
"""How long a stop waits for the broker's close-ok (the queue goes with the connection)."""

# Frame types and the frame-end octet (AMQP 0-9-1, 4.2.3).
METHOD, HEADER, BODY, HEARTBEAT = 1, 2, 3, 8
FRAME_END = 0xCE
_FRAME = struct.Struct(">BHI")  # type, channel, payload size
_PEEK = struct.Struct(">BHII")  # and the first 4 payload octets: a method's class and id
_IDS = struct.Struct(">HH")  # class id, method id
_CONTENT = struct.Struct(">QH")  # body size, first property flags word (after class, weight)
_REPLY = struct.Struct(">HB")  # reply code, length of the reply text
_FLAGS = struct.Struct(">H")
# A content header frame up to its first property flags word: type, channel, size,
# (class id, weight skipped), body size, flags.
_HEAD = struct.Struct(">BHI4xQH")
_DELIVER = (60 << 16) | 60  # basic.deliver: class 60, method 60
_CONTENT_TYPE_FLAG = 0x8000
_MORE_FLAGS = 0x0001

CONNECTION_CLOSE, CONNECTION_CLOSE_OK = (10, 50), (10, 51)
CONNECTION_BLOCKED, CONNECTION_UNBLOCKED = (10, 60), (10, 61)
CHANNEL_CLOSE, CHANNEL_CLOSE_OK = (20, 40), (20, 41)
BASIC_CANCEL = (60, 30)

# Expected next on the consumer's channel.
_ANY, _HEADER, _BODY = 0, 1, 2


def handles(url: str) -> bool:
    return url.partition("://")[0] in SCHEMES and ";" not in url


def method_frame(channel: int, ids: tuple[int, int], arguments: bytes = b"") -> bytes:
    """One method frame, for the few methods this reader sends itself."""
    payload = _IDS.pack(*ids) + arguments
    return _FRAME.pack(METHOD, channel, len(payload)) + payload + bytes((FRAME_END,))


HEARTBEAT_FRAME = _FRAME.pack(HEARTBEAT, 0, 0) + bytes((FRAME_END,))
# connection.close(200, "", 0, 0): a clean close of our own.
CLOSE_FRAME = method_frame(0, CONNECTION_CLOSE, struct.pack(">HBHH", 200, 0, 0, 0))


class ProtocolError(ConnectionError):
    """The broker broke AMQP framing: nothing more read from it can be trusted."""


class BrokerClosed(ConnectionError):
    """The broker closed the connection or the channel, or cancelled the consumer."""


MethodHandler = Callable[[int, tuple[int, int], bytes], None]


class Frames:
    """Splits frames out of bytes read in bulk and hands each delivery's body on.

    The buffer is one preallocated bytearray: reads go to ``room()``, and only
    a partial frame is ever kept, moved to the front when room runs short.
    Deliveries come on ``channel`` only; other methods (on it or on channel 0)
    go to ``on_method`` as (channel, (class id, method id), arguments). Bodies
    over ``MAX_BODY_BYTES`` are skipped frame by frame, never stored, and counted.
    """

    def __init__(self, sink: Sink, channel: int, frame_max: int, on_method: MethodHandler) -> None:
        self.sink = sink
        self.channel = channel
        limit = min(frame_max, FRAME_LIMIT)
        self.payload_max = limit - 8  # the frame header and frame-end octet count in frame_max
        self.on_method = on_method
        self.capacity = limit + 2 * READ_BYTES
        # Slack past capacity: a frame header is read with the 4 octets after it.
        self.data = bytearray(self.capacity + 4)
        self._view = memoryview(self.data)
        self.start = self.end = 0
        self._expect = _ANY
        self._remaining = 0
        self._body_size = 0
        self._parts: list[bytes] = []
        self._content_type: str | None = None
        self._known_type = b"\xff"  # the last content type as sent: length octet, then text
        self._known_str: str | None = None

    def room(self) -> memoryview:
        """Where the next read goes (never empty)."""
        return self._view[self.end : self.capacity]

    def filled(self, size: int, arrival: float) -> None:
        """``size`` octets were read into ``room()``: handle the whole frames."""
        end = self.end = self.end + size
        start = self.start = self.split(self.start, end, arrival)
        if start == end:
            self.start = self.end = 0
        elif end + READ_BYTES > self.capacity:  # the partial frame moves to the front
            self.data[: end - start] = self.data[start:end]
            self.start, self.end = 0, end - start

    def feed(self, octets: bytes, arrival: float) -> None:
        """Octets read elsewhere (py-amqp's read-ahead), in as many pieces as they need."""
        while octets:
            room = self.room()
            size = min(len(room), len(octets))
            room[:size] = octets[:size]
            self.filled(size, arrival)
            octets = octets[size:]

    def split(self, start: int, end: int, arrival: float) -> int:
        """Handle every whole frame in ``data[start:end]``; return where the rest begins."""
        data = self.data
        view = self._view
        unpack_frame = _PEEK.unpack_from
        unpack_head = _HEAD.unpack_from
        unpack_body = _FRAME.unpack_from
        payload_max = self.payload_max
        ours = self.channel
        on_body = self.sink.on_body
        while end - start >= 8:
            kind, channel, size, method = unpack_frame(data, start)
            if size > payload_max:
                raise ProtocolError(f"a {size + 8}-byte frame, over the {payload_max + 8} agreed")
            payload = start + 7
            stop = payload + size
            if stop >= end:
                break
            if data[stop] != FRAME_END:
                raise ProtocolError(f"frame-end octet {data[stop]:#04x}, not 0xce")
            if kind == METHOD and method == _DELIVER and channel == ours:
                # The common case in one go: a delivery whose header (with the content type
                # seen last, or none) and single body frame are all in the buffer.
                head = stop + 1
                if head + 22 <= end and self._expect == _ANY:
                    kind, channel, size, body_size, flags = unpack_head(data, head)
                    body = head + 8 + size
                    last = body + 7 + body_size
                    if (
                        kind == HEADER
                        and channel == ours
                        and last < end
                        and body_size <= MAX_BODY_BYTES
                        and data[body - 1] == FRAME_END
                        and data[last] == FRAME_END
                        and unpack_body(data, body) == (BODY, ours, body_size)
                        and not flags & _MORE_FLAGS
                    ):
                        if not flags & _CONTENT_TYPE_FLAG:
                            on_body(view[body + 7 : last].tobytes(), None, arrival)
                            start = last + 1
                            continue
                        known = self._known_type
                        at = head + 21
                        if size >= 14 + len(known) and data[at : at + len(known)] == known:
                            on_body(view[body + 7 : last].tobytes(), self._known_str, arrival)
                            start = last + 1
                            continue
                self._expect_header()
            elif kind == BODY:
                self._body(channel, payload, stop, arrival)
            elif kind == HEADER:
                if channel != ours or self._expect != _HEADER:
                    raise ProtocolError(f"a content header on channel {channel} out of place")
                self._header(payload, stop)
                if not self._remaining:
                    self._expect = _ANY
                    on_body(b"", self._content_type, arrival)
            elif kind == METHOD:
                if size < 4:
                    raise ProtocolError(f"a {size}-byte method frame")
                if channel != ours and channel != 0:
                    raise ProtocolError(f"a method on channel {channel}, never opened")
                if channel == ours and self._expect != _ANY:
                    raise ProtocolError("a method frame in the middle of a delivery")
                self.on_method(channel, divmod(method, 1 << 16), bytes(data[payload + 4 : stop]))
            elif kind != HEARTBEAT:
                raise ProtocolError(f"unknown frame type {kind}")
            start = stop + 1
        return start

    def _expect_header(self) -> None:
        if self._expect != _ANY:
            raise ProtocolError("a delivery in the middle of a delivery")
        self._expect = _HEADER

    def _body(self, channel: int, payload: int, stop: int, arrival: float) -> None:
        """One body frame: the body is handed on with its last frame."""
        if channel != self.channel or self._expect != _BODY:
            raise ProtocolError(f"a body frame on channel {channel} out of place")
        remaining = self._remaining - (stop - payload)
        if remaining < 0:
            raise ProtocolError("body frames longer than their content header said")
        data = self.data
        parts = self._parts
        wanted = self._body_size <= MAX_BODY_BYTES
        if remaining:
            self._remaining = remaining
            if wanted:
                parts.append(bytes(data[payload:stop]))
            return
        self._expect = _ANY
        if not wanted:
            self.sink.on_unreadable(f"a {self._body_size}-byte body", TOO_LARGE)
            return
        parts.append(bytes(data[payload:stop]))
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        self.sink.on_body(body, self._content_type, arrival)

    def _header(self, payload: int, stop: int) -> None:
        """Body size and content type from a content header; the body frames come next."""
        data = self.data
        if stop - payload < 14:
            raise ProtocolError("a content header too short for its fields")
        body_size, flags = _CONTENT.unpack_from(data, payload + 4)
        at = payload + 14
        more = flags
        while more & _MORE_FLAGS:  # further property flag words precede the properties
            if at + 2 > stop:
                raise ProtocolError("a content header cut inside its property flags")
            (more,) = _FLAGS.unpack_from(data, at)
            at += 2
        content_type = None
        if flags & _CONTENT_TYPE_FLAG:
            if at >= stop or at + 1 + data[at] > stop:
                raise ProtocolError("a content type past the end of its header")
            known = bytes(data[at : at + 1 + data[at]])
            content_type = known[1:].decode("latin-1")
            self._known_type, self._known_str = known, content_type
        self._content_type = content_type
        self._body_size = self._remaining = body_size
        self._expect = _BODY


class AMQPReceiver(KombuReceiver):
    """Consumes the event exchange on RabbitMQ, reading the socket itself."""

    def consume(self) -> None:
        connection = self._connection()
        try:
            connection.connect()
            channel = connection.default_channel
            queue = self._queue()(channel)
            queue.declare()
            channel.basic_consume(queue.name, no_ack=True, callback=_unused)
            self._read(connection.connection, channel.channel_id)
        finally:
            # Not py-amqp's close(): it would read on from the middle of our frames.
            connection.collect()

    def _read(self, client: object, channel_id: int) -> None:
        """Hand on each delivery until ``stopping``; raise when the connection is lost."""
        transport = client.transport  # type: ignore[attr-defined]
        sock: socket.socket = transport.sock
        self._sock = sock
        self._open = True
        frame_max: int = client.frame_max  # type: ignore[attr-defined]
        heartbeat: float = client.heartbeat or 0  # type: ignore[attr-defined]
        frames = Frames(self.sink, channel_id, frame_max, self._on_method)
        # What py-amqp read past consume-ok: the first deliveries, maybe.
        frames.feed(transport._read_buffer, time.time())
        room, filled, recv_into = frames.room, frames.filled, sock.recv_into
        on_idle, stopping = self.sink.on_idle, self.stopping
        sock.settimeout(min(POLL_SECONDS, heartbeat / 2) if heartbeat else POLL_SECONDS)
        self.connected()
        heard = time.monotonic()
        beat_at = heard + heartbeat / 2
        try:
            while not stopping.is_set():
                try:
                    size = recv_into(room())
                except TimeoutError:
                    size = -1
                now = time.monotonic()
                if size > 0:
                    heard = now
                    filled(size, time.time())
                elif size == 0:
                    raise ConnectionError("the broker closed the connection")
                else:
                    on_idle(time.time())
                if heartbeat:
                    if now >= beat_at:
                        sock.sendall(HEARTBEAT_FRAME)
                        beat_at = now + heartbeat / 2
                    if now - heard > 2 * heartbeat:
                        raise ConnectionError(
                            f"nothing from the broker for {now - heard:.1f} s "
                            f"(two heartbeat intervals of {heartbeat:g} s)"
                        )
        except ProtocolError as exc:
            self.sink.on_unreadable(str(exc), PROTOCOL)
            raise
        finally:
            if self._open:
                self._close(sock, frames.room())

    def _send(self, frame: bytes) -> None:
        self._sock.sendall(frame)

    def _on_method(self, channel: int, ids: tuple[int, int], arguments: bytes) -> None:
        """The broker's own methods: closes, flow control, a cancelled consumer."""
        if ids == CONNECTION_CLOSE:
            self._open = False
            with contextlib.suppress(OSError):
                self._send(method_frame(0, CONNECTION_CLOSE_OK))
            raise BrokerClosed(f"the broker closed the connection: {_reply(arguments)}")
        if ids == CHANNEL_CLOSE:
            with contextlib.suppress(OSError):
                self._send(method_frame(channel, CHANNEL_CLOSE_OK))
            raise BrokerClosed(f"the broker closed the channel: {_reply(arguments)}")
        if ids == BASIC_CANCEL:
            raise BrokerClosed("the broker cancelled the consumer: its queue was deleted")
        if ids == CONNECTION_BLOCKED:
            log.warning("broker %s blocks publishers: %s", self.health.broker, _text(arguments))
        elif ids == CONNECTION_UNBLOCKED:
            log.info("broker %s unblocks publishers", self.health.broker)
        elif ids == CONNECTION_CLOSE_OK:
            self._open = False
        else:
            log.debug("ignored AMQP method %s on channel %d", ids, channel)

    def _close(self, sock: socket.socket, view: memoryview) -> None:
        """connection.close, then read until the broker hangs up (or a short while)."""
        self._open = False
        deadline = time.monotonic() + CLOSE_SECONDS
        with contextlib.suppress(OSError):
            sock.sendall(CLOSE_FRAME)
            sock.settimeout(CLOSE_SECONDS)
            while sock.recv_into(view) and time.monotonic() < deadline:
                pass


def _text(arguments: bytes, at: int = 0) -> str:
    """A short string argument."""
    length = arguments[at] if at < len(arguments) else 0
    return arguments[at + 1 : at + 1 + length].decode("utf-8", "replace")


def _reply(arguments: bytes) -> str:
    """'<code> <text>' from a connection.close or channel.close."""
    if len(arguments) < 3:
        return "no reason given"
    code, _ = _REPLY.unpack_from(arguments)
    return f"{code} {_text(arguments, 2)}"


def _unused(message: object) -> None:
    """basic_consume wants a callback; deliveries never reach py-amqp."""
