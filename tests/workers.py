"""Real Celery worker processes for the tests.

A worker runs ``python -m celery -A tests.celery_app worker`` in its own
session, so ``kill()`` can SIGKILL it together with its pool children: that is
how a crashed worker looks (no worker-offline event), as opposed to
``stop()``, a warm shutdown that sends worker-offline.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any, Protocol, Self

from celery.utils.nodenames import default_nodename, host_format

from tests.servers import GroupGuard, reap_group

__all__ = ["READY_TIMEOUT", "ROOT", "CeleryWorker", "WorkerFactory"]

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 60.0
_counter = itertools.count(1)


def unique_name() -> str:
    """A node name no other worker of this test run uses (``%h`` is the host name)."""
    return f"w{next(_counter)}-{uuid.uuid4().hex[:6]}@%h"


class CeleryWorker:
    """A ``celery worker`` subprocess on ``broker_url``; started by the constructor.

    ``hostname`` is the node name as the worker reports it in its events
    (``w1@%h`` becomes ``w1@<socket.gethostname()>``).
    """

    def __init__(
        self,
        broker_url: str,
        *,
        events: bool = True,
        pool: str = "prefork",
        concurrency: int = 2,
        queues: Iterable[str] = ("celery",),
        name: str | None = None,
        sent_events: bool = True,
        log_dir: Path | None = None,
        extra_args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.broker_url = broker_url
        self.name = name or unique_name()
        self._hostname = host_format(default_nodename(self.name))
        self.queues = tuple(queues)
        if log_dir is None:
            self._tmp: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(
                prefix="cee-worker-"
            )
            log_dir = Path(self._tmp.name)
        else:
            self._tmp = None
            log_dir.mkdir(parents=True, exist_ok=True)
        safe = self._hostname.replace("@", "_").replace("/", "_")
        self.log_path = log_dir / f"{safe}.log"
        self.argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.celery_app",
            "worker",
            *(["-E"] if events else []),
            "--pool",
            pool,
            "--concurrency",
            str(concurrency),
            "-Q",
            ",".join(self.queues),
            "-n",
            self.name,
            "--without-mingle",
            "--without-gossip",
            "--loglevel",
            "INFO",
            *extra_args,
        ]
        pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        child_env = {
            **os.environ,
            "TEST_BROKER_URL": broker_url,
            "TEST_SENT_EVENTS": "1" if sent_events else "0",
            "PYTHONPATH": pythonpath,
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self._log: IO[bytes] | None = open(self.log_path, "ab")  # noqa: SIM115 - closed on exit
        self.process = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pgid = self.process.pid  # start_new_session: the worker leads its own group
        self._guard: GroupGuard | None = GroupGuard(self.pgid)

    @property
    def hostname(self) -> str:
        return self._hostname

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        if self._log is not None:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def is_ready(self) -> bool:
        return f"{self._hostname} ready." in self.log_text()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> Self:
        """Wait for Celery's "<node> ready." log line: consuming, and events (if -E) on."""
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if not self.running:
                raise RuntimeError(
                    f"worker {self._hostname} exited with {self.process.returncode} before "
                    f"it was ready; log tail:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"worker {self._hostname} not ready after {timeout:g}s; log tail:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 30.0) -> int | None:
        """Warm shutdown (SIGTERM: finish running tasks, send worker-offline).

        A worker still alive after ``timeout`` is killed with its pool.
        Returns the exit status.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        return self._finish()

    def kill(self) -> int | None:
        """SIGKILL the worker and its pool children at once: no worker-offline is sent."""
        return self._finish()

    def _finish(self) -> int | None:
        returncode = reap_group(self.process, self._guard, self._log)
        self._guard = self._log = None
        return returncode

    def close(self) -> None:
        """Stop the worker if needed and delete its log unless the caller owns the directory."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CeleryWorker({self._hostname!r}, pid={self.pid}, running={self.running})"


class WorkerFactory(Protocol):
    """The type of the ``worker_factory`` fixture: starts a worker and waits until it is ready.

    ``options`` are ``CeleryWorker``'s keyword arguments, with its defaults.
    """

    def __call__(
        self,
        broker_url: str,
        *,
        ready_timeout: float = READY_TIMEOUT,
        **options: Any,
    ) -> CeleryWorker: ...
