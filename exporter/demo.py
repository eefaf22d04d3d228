"""A demo cluster that needs no broker server: ``--demo``.

A real Celery worker (events on) runs on kombu's filesystem transport in a
temporary directory; a client thread keeps sending a mix of tasks that
succeed, fail, retry, expire and get rejected; the exporter reads their
events like any other broker's. This module is also the worker's Celery app
(``celery -A exporter.demo worker``), configured through the environment.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from celery import Celery
from celery.exceptions import Reject
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.json import dumps

from .config import Config

log = logging.getLogger(__name__)

FOLDER_ENV = "CELERY_EXPORTER_DEMO_FOLDER"
TRANSPORT = "demo-filesystem"
QUEUES = ("celery", "reports")
HOST = "localhost"
"""The filesystem transport ignores the host; naming one keeps kombu from warning that
none was supplied."""
SEND_EVERY = 0.15
DEMO_INSPECT_INTERVAL = 5.0


class AtomicChannel(filesystem.Channel):
    """kombu's filesystem channel writes a message file in place, where a reader
    polling the folder can take it half-written (and a Celery worker dies of it);
    this one writes it under another name and renames it into the queue."""

    def _put(self, queue: str, payload: object, **kwargs: object) -> None:
        path = Path(
            self.data_folder_out, f"{int(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        )
        partial = path.with_suffix(".partial")
        partial.write_text(dumps(payload))
        partial.replace(path)


class AtomicTransport(filesystem.Transport):
    """The filesystem transport with whole messages only, for the demo's producers."""

    Channel = AtomicChannel


TRANSPORT_ALIASES[TRANSPORT] = f"{__name__}:AtomicTransport"


def transport_options(folder: str) -> dict[str, object]:
    """One folder for data in and out: producer, worker and exporter share it."""
    return {
        "data_folder_in": f"{folder}/data",
        "data_folder_out": f"{folder}/data",
        "control_folder": f"{folder}/control",
        "polling_interval": 0.05,
    }


def make_app(folder: str) -> Celery:
    app = Celery("demo", broker=f"{TRANSPORT}://{HOST}/", set_as_current=False)
    app.conf.update(
        broker_transport_options=transport_options(folder),
        task_send_sent_event=True,
        worker_send_task_events=True,
        task_routes={"demo.report": {"queue": "reports"}},
        worker_hijack_root_logger=False,
    )

    @app.task(name="demo.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="demo.report")
    def report(seconds: float) -> str:
        time.sleep(seconds)
        return "done"

    @app.task(name="demo.flaky")
    def flaky() -> str:
        roll = random.random()
        if roll < 0.15:
            raise ValueError("bad input")
        if roll < 0.25:
            raise KeyError("missing")
        return "ok"

    @app.task(name="demo.fetch", bind=True, max_retries=2)
    def fetch(self) -> str:
        if self.request.retries < 1:
            raise self.retry(countdown=0.5, exc=ConnectionError("upstream unavailable"))
        return "fetched"

    @app.task(name="demo.validate", acks_late=True)
    def validate() -> None:
        raise Reject("unprocessable payload", requeue=False)

    return app


# The worker process imports this module with the folder in its environment.
app = make_app(os.environ[FOLDER_ENV]) if FOLDER_ENV in os.environ else None


def send_tasks(client: Celery, stop: threading.Event) -> None:
    """Keep a realistic mix flowing until ``stop`` is set."""
    sent = 0
    while not stop.wait(SEND_EVERY):
        sent += 1
        try:
            if sent % 25 == 0:
                # Due in a second but expiring before: the worker revokes it.
                client.send_task("demo.add", (1, 2), countdown=1, expires=0.5)
            elif sent % 30 == 0:
                client.send_task("demo.validate")
            elif sent % 5 == 0:
                client.send_task("demo.report", (random.uniform(0.1, 1.5),))
            elif sent % 4 == 0:
                client.send_task("demo.fetch")
            elif sent % 3 == 0:
                client.send_task("demo.flaky")
            else:
                client.send_task("demo.add", (sent, sent))
        except OSError as exc:  # a full disk, mostly; keep the demo up
            log.warning("demo client could not send a task: %s", exc)


def start_worker(folder: str) -> subprocess.Popen[bytes]:
    """The worker logs to a file: the demo's failures are on purpose, not news."""
    with open(Path(folder, "worker.log"), "wb") as log_file:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "exporter.demo",
                "worker",
                "-E",
                "--pool",
                "prefork",
                "--concurrency",
                "2",
                "-Q",
                ",".join(QUEUES),
                "-n",
                "demo@%h",
                "--without-mingle",
                "--without-gossip",
                "--loglevel",
                "INFO",
            ],
            env={**os.environ, FOLDER_ENV: folder},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


def run(config: Config) -> int:
    """Run worker, client and exporter until Ctrl-C; remove everything after."""
    from .daemon import Daemon

    folder = tempfile.mkdtemp(prefix="celery-exporter-demo-")
    for sub in ("data", "control"):
        Path(folder, sub).mkdir()
    demo_config = dataclasses.replace(
        config,
        broker_url=f"filesystem://{HOST}/",
        broker_transport_options=transport_options(folder),
        # The worker starts after the first inspect round: the next must not be far off.
        inspect_interval=min(config.inspect_interval, DEMO_INSPECT_INTERVAL),
    )
    worker = start_worker(folder)
    stop = threading.Event()
    client = threading.Thread(target=send_tasks, args=(make_app(folder), stop), daemon=True)
    client.start()
    log.info(
        "demo cluster in %s (worker log: worker.log); the live overview: http://localhost:%d/",
        folder,
        config.port,
    )
    try:
        Daemon.build(demo_config).run()
    finally:
        stop.set()
        client.join(5)
        stop_worker(worker)
        shutil.rmtree(folder, ignore_errors=True)
    return 0
