"""The lean AMQP reader: its frame splitter on byte streams, then real RabbitMQ nodes.

The splitter is fed streams of frames as RabbitMQ sends them, cut at every
offset, and broken ones; the rest runs a private node configured the way a
test needs it (TLS, a short heartbeat, a small frame_max).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import amqp
import orjson
import pytest

from exporter.broker.amqp_reader import (
    BODY,
    CONNECTION_BLOCKED,
    FRAME_END,
    HEADER,
    HEARTBEAT_FRAME,
    METHOD,
    PROTOCOL,
    READ_BYTES,
    AMQPReceiver,
    Frames,
    ProtocolError,
    method_frame,
)
from exporter.decode import MAX_BODY_BYTES, TOO_LARGE
from tests import test_integration as integration
from tests.celery_app import make_app
from tests.harness import InProcessExporter
from tests.servers import RabbitMQServer, free_port, wait_for
from tests.test_outages import SENT, sent_events
from tests.test_web_security import make_party

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


# ----------------------------------------------------------------------------- real nodes

CONNECTED = "celery_exporter_broker_connected"
RECONNECTS = "celery_exporter_broker_reconnects_total"
INVALID = "celery_exporter_events_invalid_total"
HEARTBEAT_SECONDS = 2
SMALL_FRAME_MAX = 4096  # RabbitMQ's smallest


@dataclass
class TunedNode:
    """A node with a short heartbeat, the smallest frame_max and a TLS listener."""

    server: RabbitMQServer
    tls_port: int
    ca: Path

    @property
    def tls_url(self) -> str:
        return f"amqps://guest:guest@127.0.0.1:{self.tls_port}//"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TunedNode]:
    directory = tmp_path_factory.mktemp("amqp-pki")
    ca, ca_cert, ca_key = make_party(directory, "ca", None)
    server_cert = make_party(directory, "server", (ca_cert, ca_key), server=True)[0]
    tls_port = free_port()
    config = (
        f"heartbeat = {HEARTBEAT_SECONDS}\n"
        f"frame_max = {SMALL_FRAME_MAX}\n"
        f"listeners.ssl.1 = 127.0.0.1:{tls_port}\n"
        f"ssl_options.cacertfile = {ca.cert}\n"
        f"ssl_options.certfile = {server_cert.cert}\n"
        f"ssl_options.keyfile = {server_cert.key}\n"
        "ssl_options.verify = verify_none\n"
        "ssl_options.fail_if_no_peer_cert = false\n"
    )
    try:
        server = RabbitMQServer(config=config)
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    with server:
        yield TunedNode(server, tls_port, ca.cert)


@pytest.fixture
def exporters() -> Iterator[Callable[..., InProcessExporter]]:
    started: list[InProcessExporter] = []

    def start(url: str, *argv: str) -> InProcessExporter:
        exporter = InProcessExporter(["--broker-url", url, *argv])
        started.append(exporter)
        assert type(exporter.daemon.receiver) is AMQPReceiver
        wait_for(lambda: exporter.sample(CONNECTED) == 1, 20, "the exporter never connected")
        return exporter

    yield start
    for exporter in started:
        exporter.stop()


def publish(server: RabbitMQServer, bodies: list[bytes]) -> None:
    """Bodies straight to the event exchange with py-amqp, as JSON."""
    connection = amqp.Connection(f"127.0.0.1:{server.port}", userid="guest", password="guest")
    connection.connect()
    try:
        channel = connection.channel()
        for body in bodies:
            message = amqp.Message(body, content_type=JSON, content_encoding="utf-8")
            channel.basic_publish(message, exchange="celeryev", routing_key="task.multi")
    finally:
        connection.close()


def counted(exporter: InProcessExporter, name: str, count: int, timeout: float = 15) -> None:
    wait_for(
        lambda: exporter.sample(SENT, {"name": name, "queue": "celery"}) == count,
        timeout,
        lambda: f"{name}: {exporter.sample(SENT, {'name': name, 'queue': 'celery'})} of {count}",
    )


def test_bodies_over_several_frames(tuned: TunedNode, exporters: Callable[..., Any]) -> None:
    exporter = exporters(tuned.server.url)
    bodies = [orjson.dumps(sent_events(150, "big")) for _ in range(20)]
    assert all(len(body) > 3 * SMALL_FRAME_MAX for body in bodies)
    publish(tuned.server, bodies)
    counted(exporter, "big", 20 * 150)
    assert exporter.total("celery_exporter_events_invalid_total") == 0


def test_an_idle_connection_lives_on_heartbeats(
    tuned: TunedNode, exporters: Callable[..., Any]
) -> None:
    """Idle for five heartbeat intervals of 2 s, then a node that stops answering.

    RabbitMQ drops a client after two missed heartbeats (4 s here), so 10 s
    idle shows ours go out on time as well as three minutes would, in the
    time a test can spend. Then the node is frozen (SIGSTOP): the reader must
    call the silent connection lost within two intervals, and come back.
    """
    exporter = exporters(tuned.server.url)
    time.sleep(5 * HEARTBEAT_SECONDS)  # the idle time is the test: nothing to wait for
    assert exporter.sample(CONNECTED) == 1
    assert exporter.sample(RECONNECTS) == 0
    publish(tuned.server, [orjson.dumps(sent_events(3, "idle"))])
    counted(exporter, "idle", 3)

    os.killpg(tuned.server.pid, signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        wait_for(lambda: exporter.sample(CONNECTED) == 0, 4 * HEARTBEAT_SECONDS, "silence unseen")
        assert time.monotonic() - frozen >= 2 * HEARTBEAT_SECONDS - 1
        assert "nothing from the broker" in exporter.daemon.health.last_error
    finally:
        os.killpg(tuned.server.pid, signal.SIGCONT)
    wait_for(lambda: exporter.sample(CONNECTED) == 1, 20, "not reconnected after the thaw")
    publish(tuned.server, [orjson.dumps(sent_events(4, "idle"))])
    counted(exporter, "idle", 7)
    assert exporter.sample(RECONNECTS) == 1


def test_amqps_with_a_test_ca(tuned: TunedNode, exporters: Callable[..., Any]) -> None:
    exporter = exporters(
        tuned.tls_url,
        "--broker-ssl-option",
        f"ca_certs={tuned.ca}",
        "--broker-ssl-option",
        "cert_reqs=CERT_REQUIRED",
    )
    connections = tuned.server.ctl("list_connections", "-q", "ssl", "peer_port")
    assert "true" in connections
    publish(tuned.server, [orjson.dumps(sent_events(5, "tls")) for _ in range(4)])
    counted(exporter, "tls", 20)


def event_queues(server: RabbitMQServer) -> list[str]:
    return [name for name in server.queues() if name.startswith("celeryev.")]


def test_a_deleted_queue_is_declared_again(
    clean_rabbitmq: RabbitMQServer, exporters: Callable[..., Any]
) -> None:
    exporter = exporters(clean_rabbitmq.url)
    publish(clean_rabbitmq, [orjson.dumps(sent_events(10, "deleted"))])
    counted(exporter, "deleted", 10)
    (queue,) = event_queues(clean_rabbitmq)  # inspect rounds have a reply queue of their own
    clean_rabbitmq.ctl("delete_queue", queue)
    wait_for(lambda: exporter.sample(RECONNECTS) == 1, 10, "the deletion went unnoticed")
    wait_for(lambda: exporter.sample(CONNECTED) == 1, 10, "not reconnected")
    assert event_queues(clean_rabbitmq) not in ([], [queue])
    publish(clean_rabbitmq, [orjson.dumps(sent_events(5, "deleted"))])
    counted(exporter, "deleted", 15)
    assert exporter.total("celery_exporter_events_invalid_total") == 0


def test_every_outcome_from_a_threads_pool(
    clean_rabbitmq: RabbitMQServer,
    exporters: Callable[..., Any],
    worker_factory: Callable[..., Any],
) -> None:
    """Threads send one event per message: each outcome counted exactly, unbatched."""
    exporter = exporters(clean_rabbitmq.url)
    worker = worker_factory(clean_rabbitmq.url, pool="threads", concurrency=4)
    wait_for(
        lambda: exporter.sample("celery_worker_up", {"hostname": worker.hostname}) == 1,
        30,
        "no heartbeat from the worker",
    )
    app = make_app(clean_rabbitmq.url)
    for i in range(6):
        app.send_task("tests.add", (i, i))
    for _ in range(3):
        app.send_task("tests.fail", ("boom",))
    app.send_task("tests.add", (1, 1), countdown=2, expires=1)
    on = {"hostname": worker.hostname, "queue": "celery"}
    add = {"name": "tests.add", **on}
    expected = {
        ("celery_task_sent_total", (("name", "tests.add"), ("queue", "celery"))): 7,
        ("celery_task_received_total", integration._key(add)): 7,
        ("celery_task_started_total", integration._key(add)): 6,
        ("celery_task_succeeded_total", integration._key(add)): 6,
        ("celery_task_revoked_total", integration._key(add)): 1,
        (
            "celery_task_failed_total",
            integration._key({**on, "name": "tests.fail", "exception": "ValueError"}),
        ): 3,
        ("celery_exporter_tracked_tasks", ()): 0,
    }
    wait_for(
        lambda: not integration._mismatches(exporter, expected),
        60,
        lambda: f"differences (got, expected): {integration._mismatches(exporter, expected)}",
    )
    assert exporter.total("celery_exporter_events_invalid_total") == 0


class Proxy:
    """Forwards TCP to a broker and can slip octets of its own into what the client reads.

    Octets go in while the broker is idle, so between its frames: a broker
    that breaks the framing, with everything else about it real.
    """

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.clients: dict[int, socket.socket] = {}  # by the client's own port
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, (_, client_port) = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.clients[client_port] = client
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                with self.lock:
                    sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def inject(self, client_port: int, octets: bytes) -> None:
        """Into the connection from ``client_port``, towards the client."""
        with self.lock:
            self.clients[client_port].sendall(octets)

    def close(self) -> None:
        self.listener.close()
        for client in self.clients.values():
            client.close()


@pytest.mark.parametrize(
    "octets",
    [frame(5, 0, b""), frame(METHOD, 7, b"\x00\x3c\x00\x3c"), frame(8, 0, b"")[:-1] + b"\x00"],
    ids=["unknown frame type", "unknown channel", "missing frame-end"],
)
def test_a_broker_breaking_the_framing_is_counted_and_reconnected_to(
    clean_rabbitmq: RabbitMQServer, exporters: Callable[..., Any], octets: bytes
) -> None:
    proxy = Proxy(clean_rabbitmq.port)
    try:
        exporter = exporters(f"amqp://guest:guest@127.0.0.1:{proxy.port}//")
        publish(clean_rabbitmq, [orjson.dumps(sent_events(5, "framing"))])
        counted(exporter, "framing", 5)
        # The reader's connection, not the queue probes'.
        proxy.inject(exporter.daemon.receiver._sock.getsockname()[1], octets)
        wait_for(lambda: exporter.sample(RECONNECTS) == 1, 10, "the broken frame went unnoticed")
        assert exporter.sample(INVALID, {"reason": PROTOCOL}) == 1
        wait_for(lambda: exporter.sample(CONNECTED) == 1, 10, "not reconnected")
        publish(clean_rabbitmq, [orjson.dumps(sent_events(5, "framing"))])
        counted(exporter, "framing", 10)
    finally:
        proxy.close()
