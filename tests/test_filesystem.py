"""The filesystem transport (the demo's): a message file read mid-write costs that message only."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import orjson
from kombu import Connection, Exchange, Producer

from tests.events import heartbeat
from tests.harness import InProcessExporter
from tests.servers import wait_for


def test_an_unreadable_message_file_is_counted_and_the_next_one_read(tmp_path: Path) -> None:
    data, control = str(tmp_path / "data"), str(tmp_path / "control")
    options = {
        "data_folder_in": data,
        "data_folder_out": data,
        "control_folder": control,
        "polling_interval": 0.05,
    }
    for folder in ("data", "control"):
        (tmp_path / folder).mkdir()
    flags = [
        item
        for key, value in options.items()
        for item in ("--broker-transport-option", f"{key}={value}")
    ]
    exporter = InProcessExporter(["--broker-url", "filesystem://", *flags])
    try:
        table = tmp_path / "control" / "celeryev.exchange"
        # kombu writes its binding table in place: read it once it parses.
        queue = wait_for(
            lambda: json.loads(table.read_text())[0][2],
            20,
            "the exporter never bound its queue",
            ignore=(OSError, ValueError, IndexError),
        )
        # What a reader sees of a message whose writer has not written yet: nothing.
        (tmp_path / "data" / f"1_{uuid.uuid4()}.{queue}.msg").write_bytes(b"")
        wait_for(
            lambda: (
                exporter.sample("celery_exporter_events_invalid_total", {"reason": "malformed"})
                == 1
            ),
            20,
            "the unreadable file was not counted",
        )
        # kombu writes a message file in place too: written aside and moved in
        # whole, the next message cannot be read mid-write as the first was.
        staging = tmp_path / "staging"
        staging.mkdir()
        writer = {**options, "data_folder_out": str(staging)}
        with Connection("filesystem://", transport_options=writer) as connection:
            Producer(connection).publish(
                orjson.dumps(heartbeat("celery@fs", 1.0)),
                exchange=Exchange("celeryev", "topic"),
                routing_key="worker.heartbeat",
                content_type="application/json",
                content_encoding="utf-8",
            )
        (written,) = staging.iterdir()
        written.rename(tmp_path / "data" / written.name)
        wait_for(
            lambda: exporter.sample("celery_worker_up", {"hostname": "celery@fs"}) == 1,
            20,
            "the receiver did not carry on after the unreadable file",
        )
    finally:
        exporter.stop()
