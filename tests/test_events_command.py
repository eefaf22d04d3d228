"""``celery-events-exporter events``: a real worker's events, printed live and filtered exactly."""

from __future__ import annotations

import io
import json
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from exporter.commands.check import Observer, diagnose, report
from exporter.commands.events_cmd import Printer
from exporter.config import load
from exporter.health import Health
from exporter.telemetry.metrics import Metrics
from tests.celery_app import make_app
from tests.harness import CommandProcess
from tests.test_hostile_input import (
    MIXED_BATCH,
    REDIS_DB,
    event,
    expected_counts,
    hostile_messages,
    publish_to_amqp,
    publish_to_redis,
)
from tests.workers import WorkerFactory

WAIT = ["--seconds", "60"]  # an upper bound: each command ends by its --count


def _events(*argv: str, env: dict[str, str] | None = None) -> CommandProcess:
    return CommandProcess(["events", *argv, *WAIT], env=env)


def _json_lines(command: CommandProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in command.stdout().splitlines()]


def test_a_workload_is_printed_exactly_and_filters_select_exactly(
    broker: Any, worker_factory: WorkerFactory, tmp_path: Path
) -> None:
    worker = worker_factory(broker.url)
    config_file = tmp_path / "exporter.yaml"
    config_file.write_text(f"broker_url: {broker.url}\n")
    # Three adds, one fail, one fail_key: 5 sent, received and started, 3 succeeded, 2 failed.
    everything = _events(
        "--json", "--type", "task-*", "--count", "20",
        env={"CELERY_EXPORTER_BROKER_URL": broker.url},
    )  # fmt: skip
    failures = _events(
        "--broker-url", broker.url, "--task", "tests.fail*", "--worker", worker.hostname,
        "--count", "6",
    )  # fmt: skip
    adds = _events(
        "--config", str(config_file), "--json", "--type", "task-s*", "--task", "tests.add",
        "--count", "9",
    )  # fmt: skip
    heartbeat = _events(
        "--broker-url", broker.url, "--type", "worker-heartbeat", "--worker", worker.hostname,
        "--count", "1",
    )  # fmt: skip
    commands = (everything, failures, adds, heartbeat)
    for command in commands:
        command.wait_listening()

    app = make_app(broker.url)
    add_ids = [app.send_task("tests.add", (i, i)).id for i in range(3)]
    fail_id = app.send_task("tests.fail", ("boom",)).id
    fail_key_id = app.send_task("tests.fail_key").id
    for command in commands:
        assert command.wait() == 0, command.stderr()

    kinds = ("task-sent", "task-received", "task-started")
    expected = {(kind, uuid) for uuid in (*add_ids, fail_id, fail_key_id) for kind in kinds}
    expected |= {("task-succeeded", uuid) for uuid in add_ids}
    expected |= {("task-failed", fail_id), ("task-failed", fail_key_id)}
    printed = _json_lines(everything)
    assert Counter((e["type"], e["uuid"]) for e in printed) == Counter(expected)
    assert all(isinstance(e["arrival"], float) for e in printed)
    failed = next(e for e in printed if e["type"] == "task-failed" and e["uuid"] == fail_id)
    assert failed["exception"] == "ValueError('boom')"
    assert failed["hostname"] == worker.hostname

    lines = failures.stdout().splitlines()
    assert len(lines) == 6, lines
    for uuid, name in ((fail_id, "tests.fail"), (fail_key_id, "tests.fail_key")):
        mine = [line.split()[1] for line in lines if f"{name}[{uuid}]" in line]
        assert mine == ["task-received", "task-started", "task-failed"], lines
    assert all(f" {worker.hostname} " in line for line in lines)
    assert any(line.endswith("exception=ValueError('boom')") for line in lines), lines

    printed = _json_lines(adds)
    wanted = ("task-sent", "task-started", "task-succeeded")
    assert Counter((e["type"], e["uuid"]) for e in printed) == Counter(
        (kind, uuid) for uuid in add_ids for kind in wanted
    )
    assert all(e["runtime"] >= 0 for e in printed if e["type"] == "task-succeeded")

    (line,) = heartbeat.stdout().splitlines()
    assert f" worker-heartbeat {worker.hostname} active=0 processed=" in line


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_end_it_cleanly(clean_redis: Any, signum: int) -> None:
    command = _events("--broker-url", clean_redis.url)
    command.wait_listening()
    assert command.stop(signum) == 0
    assert "Traceback" not in command.stderr()


def test_hostile_messages_show_as_dropped_lines(broker: Any, tmp_path: Path) -> None:
    if broker.url.startswith("redis"):
        url = f"redis://127.0.0.1:{broker.port}/{REDIS_DB}"
        publish = publish_to_redis(url)
    else:
        url = broker.url
        publish = publish_to_amqp(url)
    # Four valid events among the hostile ones, and one last that ends the command.
    command = _events("--broker-url", url, "--json", "--count", "5")
    command.wait_listening()
    trap = tmp_path / "unpickled"
    messages = hostile_messages(trap)
    for body, content_type, _ in messages:
        publish(body, content_type)
    publish(orjson.dumps(MIXED_BATCH), "application/json")
    publish(orjson.dumps(event("task-started", uuid="last")), "application/json")
    assert command.wait() == 0, command.stderr()

    lines = _json_lines(command)
    dropped = Counter(line["dropped"] for line in lines if "dropped" in line)
    assert dropped == {reason: n for reason, n in expected_counts(messages).items() if n}
    valid = [line for line in lines if "dropped" not in line]
    assert [line["uuid"] for line in valid] == ["u4", "u4", "m1", "m1", "last"]
    assert not trap.exists(), "a pickle body was unpickled"


def test_text_from_the_network_cannot_drive_the_terminal() -> None:
    """Hostnames, names and exceptions are printed with control characters escaped."""
    hostile = "w1@\x1b]0;owned\x07host\n"
    out = io.StringIO()
    printer = Printer(out, threading.Event())
    observer = Observer()
    for listener in (printer, observer):
        listener.handle(event("task-received", uuid="u\r1", name="\x1b[2Jx", hostname=hostile), 1.0)
        listener.handle(event("worker-heartbeat", hostname=hostile, sw_ident="\x1b[31m"), 1.0)
        listener.dropped("malformed", "bad \x1b[31m body")
    found = diagnose(load(["--broker-url", "redis://x/0"], environ={}), 1, observer,
                     Health(Metrics(), "redis://x/0"), reached=True)  # fmt: skip
    for text in (out.getvalue(), report(found)):
        assert "\x1b" not in text and "\x07" not in text and "\r" not in text, text
        assert "w1@\\x1b]0;owned\\x07host\\n" in text, text
    assert len(out.getvalue().splitlines()) == 3
