"""SIGTERM and SIGINT: a prompt, clean exit that leaves nothing on the broker.

The exporter runs as its own process (``python -m exporter``); the stop must
take at most about 2 s, asserted here against a generous deadline and
printed, and the broker must have forgotten the exporter afterwards: no
``celeryev.*exporter*`` queue on RabbitMQ, no subscriber on Redis.
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from tests.harness import ExporterProcess
from tests.servers import RabbitMQServer, RedisServer, SilentServer, wait_for

DEADLINE = 5.0
"""Generous bound on the stop; the requirement is 2 s, reported by the print below."""
SIGNALS = [signal.SIGTERM, signal.SIGINT]


def stop_and_time(exporter: ExporterProcess, signum: int) -> None:
    started = time.monotonic()
    exporter.process.send_signal(signum)
    try:
        status = exporter.process.wait(DEADLINE)
    except subprocess.TimeoutExpired:
        exporter.stop(signal.SIGKILL)
        raise AssertionError(
            f"still running {DEADLINE:g} s after {signal.Signals(signum).name}:\n{exporter.log()}"
        ) from None
    took = time.monotonic() - started
    log = exporter.log()
    exporter.stop()
    print(f"{signal.Signals(signum).name}: exited with {status} after {took:.2f} s")
    assert status == 0, log
    assert "stopped" in log
    assert "Traceback" not in log


def connected(exporter: ExporterProcess) -> bool:
    return exporter.sample("celery_exporter_broker_connected") == 1


def exporter_queues(server: RabbitMQServer, vhost: str) -> list[str]:
    listing = server.ctl("list_queues", "-p", vhost, "-q", "--no-table-headers", "name")
    return [
        name for name in listing.split() if name.startswith("celeryev.") and ".exporter." in name
    ]


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_stop_on_rabbitmq_removes_the_queue(rabbitmq_server: RabbitMQServer, signum: int) -> None:
    vhost = f"shutdown-{signal.Signals(signum).name.lower()}"
    url = rabbitmq_server.add_vhost(vhost)
    exporter = ExporterProcess(["--broker-url", url])
    try:
        exporter.wait_serving()
        wait_for(lambda: connected(exporter), 15, "never connected")
        assert len(exporter_queues(rabbitmq_server, vhost)) == 1
        stop_and_time(exporter, signum)
        assert exporter_queues(rabbitmq_server, vhost) == []
    finally:
        exporter.stop(signal.SIGKILL)
        rabbitmq_server.delete_vhost(vhost)


def pubsub_clients(server: RedisServer) -> int:
    with server.client() as client:
        return sum(
            1
            for entry in client.client_list()
            if int(entry.get("psub", 0)) or int(entry.get("sub", 0))
        )


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_stop_on_redis_closes_the_subscription(signum: int) -> None:
    with RedisServer() as server:
        exporter = ExporterProcess(["--broker-url", server.url])
        try:
            exporter.wait_serving()
            wait_for(lambda: connected(exporter), 15, "never connected")
            assert pubsub_clients(server) == 1
            stop_and_time(exporter, signum)
            wait_for(lambda: pubsub_clients(server) == 0, 5, "the subscription outlived the exit")
        finally:
            exporter.stop(signal.SIGKILL)


def test_stop_while_the_broker_is_away() -> None:
    """Mid-backoff, the stop is just as prompt."""
    with RedisServer(start=False) as server:
        exporter = ExporterProcess(["--broker-url", server.url])
        try:
            exporter.wait_serving()
            wait_for(
                lambda: "reconnecting with backoff" in exporter.log(),
                10,
                "no connection attempt logged",
            )
            stop_and_time(exporter, signal.SIGTERM)
        finally:
            exporter.stop(signal.SIGKILL)


def test_stop_while_a_queue_probe_hangs() -> None:
    """A broker that accepts and never answers holds a probe thread, not the stop."""
    silent = SilentServer()
    exporter = ExporterProcess(
        [
            "--broker-url",
            f"redis://127.0.0.1:{silent.port}/0",
            "--queue-probe-timeout",
            "60",
            "--queue-poll-interval",
            "1",
        ]
    )
    try:
        exporter.wait_serving()
        wait_for(lambda: len(silent.accepted) >= 2, 30, "the receiver and the probe connecting")
        stop_and_time(exporter, signal.SIGTERM)
    finally:
        exporter.stop(signal.SIGKILL)
        silent.close()
