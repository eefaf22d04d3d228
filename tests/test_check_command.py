"""``celery-events-exporter check``: a diagnosis of real workers, and the documented exit codes."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from exporter import cli, config
from tests.celery_app import make_app
from tests.harness import CommandProcess
from tests.servers import RabbitMQServer, RedisServer
from tests.workers import WorkerFactory

SECONDS = "6"  # three heartbeats of a worker


def _check(*argv: str, env: dict[str, str] | None = None) -> CommandProcess:
    return CommandProcess(["check", "--seconds", SECONDS, *argv], env=env)


@contextmanager
def _tasks_flowing(broker_url: str) -> Iterator[None]:
    """A task every 0.2 s while the checks listen, so workers' ``processed`` grows."""
    app = make_app(broker_url)
    stop = threading.Event()

    def send() -> None:
        while not stop.wait(0.2):
            app.send_task("tests.add", (1, 2))

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        yield
    finally:
        stop.set()
        sender.join(5)


def _report(command: CommandProcess) -> dict[str, Any]:
    return json.loads(command.stdout())


def test_on_redis_a_healthy_worker_passes_and_a_wrong_exchange_or_database_fails(
    clean_redis: RedisServer, worker_factory: WorkerFactory
) -> None:
    worker = worker_factory(clean_redis.url)
    healthy = _check("--broker-url", clean_redis.url, "--json")
    exchange = _check("--broker-url", clean_redis.url, "--events-exchange", "nope")
    database = _check("--broker-url", clean_redis.url_for(3))
    with _tasks_flowing(clean_redis.url):
        codes = [command.wait() for command in (healthy, exchange, database)]
    assert codes == [0, 1, 1], [healthy.stdout(), exchange.stdout(), database.stdout()]

    report = _report(healthy)
    assert report["ok"] and report["problems"] == [] and report["reached"]
    (seen,) = report["workers"]
    assert seen["hostname"] == worker.hostname
    assert seen["task_events"] > 0 and seen["processed_while_listening"] > 0
    assert seen["heartbeat_interval_seconds"] == 2.0
    assert abs(seen["clock_offset_seconds"]) < 1.0
    assert seen["software"].startswith("py-celery 5.")
    assert report["sent_events"] is True
    (celery,) = [queue for queue in report["queues"] if queue["name"] == "celery"]
    assert celery["consumers"] is None and celery["messages"] >= 0

    for command, where in ((exchange, "exchange 'nope'"), (database, "database 3")):
        text = command.stdout()
        assert "nothing arrived in 6 s" in text and where in text, text
        assert text.endswith("1 problem found\n"), text


def test_a_worker_without_task_events_is_named(
    clean_redis: RedisServer, worker_factory: WorkerFactory
) -> None:
    with_events = worker_factory(clean_redis.url)
    without = worker_factory(clean_redis.url, events=False)
    command = _check("--broker-url", clean_redis.url)
    with _tasks_flowing(clean_redis.url):
        assert command.wait() == 1, command.stdout()
    text = command.stdout()
    problems = text.split("problems:\n")[1].split("\n1 problem found")[0]
    assert problems.startswith(f"  - {without.hostname} processed "), text
    assert "sent no task events" in problems and "-E" in problems
    assert "worker_send_task_events = True" in problems
    assert with_events.hostname not in problems
    assert "sent events: on" in text


def test_on_rabbitmq_a_healthy_worker_passes_and_another_vhost_fails(
    clean_rabbitmq: RabbitMQServer, fresh_vhost: str, worker_factory: WorkerFactory
) -> None:
    worker = worker_factory(clean_rabbitmq.url)
    healthy = _check("--broker-url", clean_rabbitmq.url, "--json")
    empty_vhost = _check("--broker-url", fresh_vhost)
    missing_vhost = _check("--broker-url", clean_rabbitmq.url_for("no-such-vhost"))
    with _tasks_flowing(clean_rabbitmq.url):
        codes = [command.wait() for command in (healthy, empty_vhost, missing_vhost)]
    assert codes == [0, 1, 1], [healthy.stdout(), empty_vhost.stdout(), missing_vhost.stdout()]

    report = _report(healthy)
    assert report["ok"], report
    assert [seen["hostname"] for seen in report["workers"]] == [worker.hostname]
    assert report["workers"][0]["task_events"] > 0
    (celery,) = [queue for queue in report["queues"] if queue["name"] == "celery"]
    assert celery["consumers"] == 1

    vhost = fresh_vhost.rsplit("/", 1)[1]
    text = empty_vhost.stdout()
    assert "nothing arrived" in text and f"vhost (this URL reads vhost '{vhost}')" in text, text
    text = missing_vhost.stdout()
    assert "NOT reached" in text and "the vhost does not exist" in text, text


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--seconds", "0"], {}, "argument --seconds: expected a number above 0, got '0'"),
        (["--port", "9808"], {}, "unrecognized arguments: --port 9808"),
        ([], {}, "broker_url: required: set --broker-url"),
        (
            [],
            {"CELERY_EXPORTER_BROKER_URL": "redis://x/0", "CELERY_EXPORTER_EVENT_EXCHANGE": "x"},
            "unknown environment variable CELERY_EXPORTER_EVENT_EXCHANGE "
            "(did you mean events_exchange?)",
        ),
        (["--config", "{file}"], {}, "evnts_exchange: unknown key in"),
    ],
)
def test_a_configuration_mistake_exits_2_with_one_line(
    tmp_path: Path, argv: list[str], env: dict[str, str], message: str
) -> None:
    path = tmp_path / "exporter.yaml"
    path.write_text("broker_url: redis://x/0\nevnts_exchange: x\n")
    command = CommandProcess(
        ["check", *(arg.format(file=path) for arg in argv)],
        env={"CELERY_EXPORTER_BROKER_URL": "", **env},
    )
    assert command.wait(30) == 2
    assert command.stdout() == ""
    (line,) = command.stderr().splitlines()
    assert line.startswith("celery-events-exporter check: error: ") and message in line, line


def test_help_lists_the_commands_and_each_has_its_own() -> None:
    assert "celery-events-exporter events [OPTIONS]" in config.build_parser().format_help()
    events = cli.command_parser("events").format_help()
    check = cli.command_parser("check").format_help()
    for flag in ("--type", "--task", "--worker", "--count", "--json", "--broker-url"):
        assert flag in events
    for flag in ("--seconds", "--json", "--events-exchange", "--queues"):
        assert flag in check
    assert "--port" not in events + check
