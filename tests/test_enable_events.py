"""--enable-events: workers started without -E begin sending task events."""

from __future__ import annotations

import time
import uuid

from tests.celery_app import make_app
from tests.harness import InProcessExporter
from tests.servers import wait_for

TASKS = 5


def test_a_worker_without_dash_e_sends_task_events_once_enabled(
    broker,
    worker_factory,
) -> None:
    url = broker.url
    queue = f"quiet-{uuid.uuid4().hex[:8]}"
    exporter = InProcessExporter(
        ["--broker-url", url, "--enable-events", "--enable-events-interval", "1"]
    )
    try:
        worker = worker_factory(url, events=False, queues=(queue,))
        host = {"hostname": worker.hostname}
        # Heartbeats come without -E; task events are what enable_events turns on.
        wait_for(
            lambda: exporter.sample("celery_worker_up", host) == 1, 60, "the worker's heartbeat"
        )
        app = make_app(url, sent_events=False)
        last_sent = [0.0]

        def events_enabled() -> bool:
            """A noop a second until one is seen to succeed: then events are on."""
            if exporter.total("celery_task_succeeded_total", name="tests.noop", **host):
                return True
            if time.monotonic() - last_sent[0] >= 1.0:
                last_sent[0] = time.monotonic()
                app.send_task("tests.noop", queue=queue)
            return False

        wait_for(events_enabled, 60, "a task event from the worker")
        for number in range(TASKS):
            app.send_task("tests.add", (number, 1), queue=queue)
        wait_for(
            lambda: (
                exporter.total("celery_task_succeeded_total", name="tests.add", **host) >= TASKS
            ),
            60,
            f"{TASKS} tasks succeeded",
        )
        assert exporter.total("celery_task_succeeded_total", name="tests.add", **host) == TASKS
        assert exporter.total("celery_task_started_total", name="tests.add", **host) == TASKS
    finally:
        exporter.stop()
