"""Running the exporter under test: in this process, or as its own process.

In-process daemons give tests the registry itself (``sample()``); the
subprocess form is for what only a real process shows: signals, exit
status, start-up errors and the console script.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from exporter import config
from exporter.daemon import Daemon
from tests.servers import wait_for

ROOT = Path(__file__).resolve().parent.parent
WORKER_TIMEOUT = 3
"""The ``exporter`` fixture's --worker-timeout: a killed worker is down within seconds."""


class InProcessExporter:
    """A daemon on its own thread, serving on a free port."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.config = config.load([*argv, "--port", "0", "--host", "127.0.0.1"], environ={})
        self.daemon = Daemon.build(self.config)
        self.server = self.daemon.serve()
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.daemon.receiver.run, daemon=True)
        self._thread.start()
        self.daemon.start_background()

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's value from the registry, 0 when the series does not exist."""
        value = self.daemon.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value

    def total(self, metric: str, /, **match: str) -> float:
        """Sum of a family's samples whose labels include ``match``."""
        return sum(
            sample.value
            for family in self.daemon.registry.collect()
            for sample in family.samples
            if sample.name == metric and match.items() <= sample.labels.items()
        )

    def stop(self) -> None:
        self.daemon.receiver.stop()
        self.daemon.stop_background()
        self._thread.join(10)
        self.server.shutdown()
        self.server.server_close()


def connected_exporter(argv: Sequence[str], timeout: float = 20.0) -> InProcessExporter:
    """An ``InProcessExporter`` on ``argv``, once it is connected to the broker."""
    running = InProcessExporter(argv)
    wait_for(
        lambda: running.sample("celery_exporter_broker_connected") == 1,
        timeout=timeout,
        message="exporter never connected",
    )
    return running


def scrape(url: str, path: str = "/metrics", timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url + path, timeout=timeout) as response:
        return response.read().decode()


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """Exposition text as {(sample name, labels): value}."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class ExporterProcess:
    """``python -m exporter`` as a child process."""

    def __init__(
        self, argv: Sequence[str], env: dict[str, str] | None = None, port: int | None = None
    ) -> None:
        from tests.servers import free_port

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"exporter-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "exporter",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *argv,
            ],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_serving(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                scrape(self.url, "/healthz", timeout=1.0)
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"exporter not serving:\n{self.log()}") from None
                time.sleep(0.05)

    def samples(self) -> dict[tuple[str, frozenset], float]:
        return parse(scrape(self.url))

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.samples().get((name, frozenset((labels or {}).items())), 0.0)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


class CommandProcess:
    """``python -m exporter <command> ...`` (``events``, ``check``) with stdout and stderr kept."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        directory = Path(os.environ.get("TMPDIR", "/tmp"))
        stem = f"command-{os.getpid()}-{id(self)}"
        self._out_path, self._err_path = directory / f"{stem}.out", directory / f"{stem}.err"
        self._out, self._err = open(self._out_path, "wb"), open(self._err_path, "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "exporter", *argv],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=self._out,
            stderr=self._err,
        )

    def stdout(self) -> str:
        return self._out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self._err_path.read_text(errors="replace")

    def wait_listening(self, timeout: float = 20.0) -> None:
        """Until the receiver is subscribed (its log line on stderr)."""
        deadline = time.monotonic() + timeout
        while "receiving events from" not in self.stderr():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the command is not listening:\n{self.stderr()}")
            time.sleep(0.05)

    def wait(self, timeout: float = 60.0) -> int:
        """The exit status, once it ends by itself (killed after ``timeout``)."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"the command did not end within {timeout:g} s; stdout:\n{self.stdout()}"
                f"\nstderr:\n{self.stderr()}"
            ) from None
        finally:
            self.close()

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.wait(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._out.close()
        self._err.close()


def wait_up(exporter: InProcessExporter | ExporterProcess, hostname: str) -> None:
    """Wait for the exporter to have a heartbeat of the worker."""
    wait_for(
        lambda: exporter.sample("celery_worker_up", {"hostname": hostname}) == 1,
        timeout=30,
        message=f"no heartbeat from {hostname}",
    )
