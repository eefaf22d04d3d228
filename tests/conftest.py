"""Fixtures: private Redis and RabbitMQ servers (one of each per session) and real workers.

A missing server binary fails the run with the package to install: the
integration tests are the point of this suite, skipping them would hide that
they never ran.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # so that "tests.celery_app" imports however pytest is run
    sys.path.insert(0, str(ROOT))

from tests.harness import WORKER_TIMEOUT, InProcessExporter, connected_exporter  # noqa: E402
from tests.servers import RabbitMQServer, RedisServer  # noqa: E402
from tests.workers import READY_TIMEOUT, CeleryWorker, WorkerFactory  # noqa: E402


def _start(kind: Callable[[], Any]) -> Any:
    try:
        return kind()
    except RuntimeError as exc:
        error = str(exc)
    pytest.fail(error, pytrace=False)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server for the whole session (see ``clean_redis`` to empty it)."""
    server: RedisServer = _start(RedisServer)
    yield server
    server.close()


@pytest.fixture(scope="session")
def rabbitmq_server() -> Iterator[RabbitMQServer]:
    """A private RabbitMQ node for the whole session (it takes several seconds to boot)."""
    server: RabbitMQServer = _start(RabbitMQServer)
    yield server
    server.close()


def _ensure_running(server: RedisServer | RabbitMQServer) -> None:
    """A test that stopped the broker and failed before restarting it must not break the next."""
    if not server.running:
        server.start()


@pytest.fixture
def clean_redis(redis_server: RedisServer) -> RedisServer:
    """The session's Redis, emptied (FLUSHALL: the server is private)."""
    _ensure_running(redis_server)
    redis_server.flushall()
    return redis_server


@pytest.fixture
def clean_rabbitmq(rabbitmq_server: RabbitMQServer) -> RabbitMQServer:
    """The session's RabbitMQ with every queue of vhost "/" deleted (about a second)."""
    _ensure_running(rabbitmq_server)
    rabbitmq_server.delete_queues("/")
    return rabbitmq_server


@pytest.fixture(params=["redis", "amqp"])
def broker(request: pytest.FixtureRequest) -> RedisServer | RabbitMQServer:
    """Each broker in turn, emptied first: for tests that must hold on Redis and RabbitMQ."""
    fixture = "clean_redis" if request.param == "redis" else "clean_rabbitmq"
    return request.getfixturevalue(fixture)


@pytest.fixture
def exporter(broker: RedisServer | RabbitMQServer) -> Iterator[InProcessExporter]:
    """An in-process exporter on ``broker``, connected, with a short worker timeout."""
    running = connected_exporter(
        ["--broker-url", broker.url, "--worker-timeout", str(WORKER_TIMEOUT)]
    )
    yield running
    running.stop()


@pytest.fixture
def fresh_vhost(rabbitmq_server: RabbitMQServer) -> Iterator[str]:
    """The broker URL of a new, empty RabbitMQ vhost, deleted after the test."""
    _ensure_running(rabbitmq_server)
    vhost = f"test-{uuid.uuid4().hex[:12]}"
    url = rabbitmq_server.add_vhost(vhost)
    yield url
    if rabbitmq_server.running:
        rabbitmq_server.delete_vhost(vhost)


class _Workers:
    """Starts workers and stops every one of them when its fixture ends."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[CeleryWorker] = []

    def __call__(
        self,
        broker_url: str,
        *,
        ready_timeout: float = READY_TIMEOUT,
        **options: Any,
    ) -> CeleryWorker:
        worker = CeleryWorker(broker_url, log_dir=self.log_dir, **options)
        self.started.append(worker)
        worker.wait_ready(ready_timeout)
        return worker

    def stop_all(self) -> None:
        errors = []
        for worker in reversed(self.started):
            try:
                worker.stop()
            except Exception as exc:  # stop the others all the same
                errors.append(exc)
            # Captured output shows only when the test fails: then the log helps.
            print(
                f"--- worker {worker.hostname} log tail ({worker.log_path}):\n{worker.log_tail(30)}"
            )
        if errors:
            raise errors[0]


@pytest.fixture
def worker_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerFactory]:
    """``worker_factory(broker_url, **options)``: a started, ready ``CeleryWorker`` (options as
    its constructor takes them), stopped at teardown."""
    workers = _Workers(tmp_path_factory.mktemp("workers"))
    yield workers
    workers.stop_all()


@pytest.fixture(scope="module")
def module_worker_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerFactory]:
    """As ``worker_factory``, for module-scoped fixtures: workers live until the module ends."""
    workers = _Workers(tmp_path_factory.mktemp("workers"))
    yield workers
    workers.stop_all()
