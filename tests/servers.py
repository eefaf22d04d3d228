"""Private broker servers for the test suite, on free ports, in temporary directories.

The tests never touch services that may already listen on the standard ports
(Redis 6379, RabbitMQ 5672): each server here is started by the test process,
owns its data directory and can be stopped and started again on the same port,
which is what broker-outage tests need.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Self, TypeVar

import redis

__all__ = [
    "GroupGuard",
    "RabbitMQServer",
    "RedisServer",
    "free_port",
    "group_alive",
    "kill_group",
    "reap_group",
    "wait_for",
]

T = TypeVar("T")

HOST = "127.0.0.1"

# Ports of services that may run on the machine, or that RabbitMQ derives from
# its defaults (AMQP + 20000 for distribution, rabbitmqctl's 35672-35682 range).
_RESERVED_PORTS = frozenset({4369, 5672, 6379, 15672, 25672, *range(35672, 35683)})
_handed_out: set[int] = set()


# ----------------------------------------------------------------------------- helpers


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    message: str | Callable[[], str] = "condition not met",
    *,
    interval: float = 0.05,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``predicate`` until it returns a truthy value, and return that value.

    Tests wait for conditions instead of sleeping a fixed time: fast when the
    system is fast, patient when the machine is loaded. On expiry an
    AssertionError carries ``message`` (a string, or a callable evaluated only
    then) and the last value seen. Exceptions listed in ``ignore`` count as a
    falsy result; any other exception propagates at once.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
        except ignore as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            shown = repr(last)
            if len(shown) > 500:
                shown = shown[:500] + "..."
            raise AssertionError(f"{text} (waited {timeout:g}s; last value: {shown})")
        time.sleep(interval)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _can_bind(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on, never the same one twice.

    Ports are picked below the kernel's ephemeral range, so that while a server
    is stopped for an outage test, no outgoing connection can be given its port
    and the restart on the same port cannot fail.
    """
    low, _high = _ephemeral_range()
    first = 20000 if low > 21000 else 1024
    for _ in range(500):
        port = random.randint(first, low - 1)
        if port in _handed_out or port in _RESERVED_PORTS:
            continue
        if _can_bind(port):
            _handed_out.add(port)
            return port
    for _ in range(100):  # crowded machine: let the kernel choose
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if port not in _handed_out and port not in _RESERVED_PORTS:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free TCP port found on 127.0.0.1")


def _group_members(pgid: int) -> list[int] | None:
    """Live (non-zombie) processes in a process group; None when /proc is unavailable."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..." - comm may contain spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies awaiting a reaper do not count)."""
    members = _group_members(pgid)
    if members is not None:
        return bool(members)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_group(pgid: int, timeout: float = 10.0) -> None:
    """SIGKILL every process of a group and wait until none runs any more."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    wait_for(lambda: not group_alive(pgid), timeout, f"process group {pgid} survived SIGKILL")


class GroupGuard:
    """Kills a process group if the test process dies first, however it dies.

    Servers and workers run in their own sessions (so they can be killed as a
    group, and a Ctrl-C meant for pytest does not hit them first); a pytest
    killed by ``timeout`` or SIGKILL would then leave them running forever.
    A small shell waits for EOF on a pipe only this process holds, and kills
    the group when the pipe closes: on ``release()`` (after the group is
    already gone) or when the test process exits.
    """

    _SCRIPT = 'cat >/dev/null; kill -s KILL -- "-$1" 2>/dev/null; exit 0'

    def __init__(self, pgid: int) -> None:
        self.pgid = pgid
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            ["/bin/sh", "-c", self._SCRIPT, "cee-group-guard", str(pgid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def release(self) -> None:
        """Call once the group has ended: the guard exits (its kill finds nothing)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def reap_group(
    proc: subprocess.Popen[bytes],
    guard: GroupGuard | None,
    log: IO[bytes] | None = None,
) -> int:
    """Kill what is left of ``proc``'s group (it leads its own), then free its guard and log.

    Returns ``proc``'s exit status.
    """
    if group_alive(proc.pid):
        kill_group(proc.pid)
    returncode = proc.wait()
    if guard is not None:
        guard.release()
    if log is not None:
        log.close()
    return returncode


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<{path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


# ----------------------------------------------------------------------------- servers

_live_servers: weakref.WeakSet[_ServerProcess] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    """Whatever happens to the test run, no private server outlives the process."""
    for server in list(_live_servers):
        with contextlib.suppress(Exception):
            server.close()


class _ServerProcess:
    """A server started in its own session, so its whole process tree can be killed."""

    name = "server"

    def __init__(self, tmp_prefix: str, port: int | None, startup_timeout: float) -> None:
        self._port = port or free_port()
        self.startup_timeout = startup_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix=tmp_prefix)
        self.dir = Path(self._tmp.name)
        self.log_path = self.dir / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._guard: GroupGuard | None = None
        self._log: IO[bytes] | None = None
        _live_servers.add(self)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """The broker URL of the server's default database or vhost."""
        return self.url_for()

    def url_for(self) -> str:
        """A broker URL on this server; each kind takes its own optional target (db, vhost)."""
        raise NotImplementedError

    def _spawn(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap()
        self._proc = subprocess.Popen(
            list(argv),
            cwd=self.dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._guard = GroupGuard(self._proc.pid)

    def _died(self) -> bool:
        return self._proc is None or self._proc.poll() is not None

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def _terminate(self, timeout: float) -> None:
        """SIGTERM for a clean shutdown, then SIGKILL the whole group after ``timeout``."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        self._reap()

    def kill(self) -> None:
        """SIGKILL the server and everything it spawned: a crash, not a shutdown."""
        if self._proc is not None:
            self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            reap_group(self._proc, self._guard, self._log)
            self._proc = self._guard = self._log = None

    def stop(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop the server and delete its directory."""
        try:
            self.stop()
        finally:
            _live_servers.discard(self)
            self._tmp.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RedisServer(_ServerProcess):
    """A private ``redis-server`` without persistence, on a free port.

    Started by the constructor (``start=False`` to defer); ``stop()`` and
    ``start()`` keep the port, so clients can be shown a broker outage.
    """

    name = "redis-server"

    def __init__(
        self, port: int | None = None, *, start: bool = True, startup_timeout: float = 15.0
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server not found: install Debian's redis-server package "
                "(apt-get install redis-server)"
            )
        super().__init__("cee-redis-", port, startup_timeout)
        self.binary = binary
        if start:
            self.start()

    def url_for(self, db: int = 0) -> str:
        """The broker URL for another database number, for tests wanting their own."""
        return f"redis://{HOST}:{self._port}/{db}"

    def client(self, db: int = 0, **kwargs: Any) -> redis.Redis:
        return redis.Redis(host=HOST, port=self._port, db=db, **kwargs)

    def flushall(self) -> None:
        with self.client() as client:
            client.flushall()

    def _ping(self) -> bool:
        client = self.client(socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def start(self) -> None:
        """Start (or restart) the server on its port and wait until it answers PING."""
        if self.running:
            return
        self._spawn(
            [
                self.binary,
                "--port",
                str(self._port),
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--daemonize",
                "no",
                "--logfile",
                "",
            ]
        )
        deadline = time.monotonic() + self.startup_timeout
        while not self._ping():
            if self._died() or time.monotonic() > deadline:
                why = "exited" if self._died() else "did not answer PING"
                self._reap()
                raise RuntimeError(
                    f"redis-server on port {self._port} {why}; log tail:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server (its port stays reserved for ``start()``)."""
        self._terminate(timeout)

    def __repr__(self) -> str:
        return f"RedisServer(port={self._port}, running={self.running})"


_RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
_RABBITMQCTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")

# Our own config file replaces /etc/rabbitmq/rabbitmq.conf, whose listeners
# would claim the system broker's port. A low disk limit keeps a small /tmp
# from raising a disk alarm that would block every publisher.
_RABBITMQ_CONF = """\
loopback_users.guest = true
disk_free_limit.absolute = 1MB
log.file.level = info
"""


class RabbitMQServer(_ServerProcess):
    """A private RabbitMQ node, run as the current user, with its data in a temporary directory.

    Debian's /usr/sbin/rabbitmq-server switches to the rabbitmq user and drops
    the environment, so the script under /usr/lib/rabbitmq/bin is run directly,
    with every path (HOME for the Erlang cookie, mnesia, logs, config, plugins,
    feature flags) pointing into the temporary directory. The node registers
    with its own epmd on a free port, so nothing is left behind and a system
    epmd is never touched. ``stop()``/``start()`` keep the port and the data.
    """

    name = "rabbitmq-server"

    def __init__(
        self,
        port: int | None = None,
        *,
        start: bool = True,
        startup_timeout: float = 60.0,
        config: str = "",
    ) -> None:
        """``config``: rabbitmq.conf lines added to the suite's (heartbeat, TLS listeners...)."""
        if not os.access(_RABBITMQ_SERVER, os.X_OK) or shutil.which("erl") is None:
            raise RuntimeError(
                f"{_RABBITMQ_SERVER} not found: install Debian's rabbitmq-server package "
                "(apt-get install rabbitmq-server)"
            )
        epmd = shutil.which("epmd")
        if epmd is None:
            raise RuntimeError("epmd not found: install Debian's erlang-base package")
        super().__init__("cee-rabbitmq-", port, startup_timeout)
        self.epmd_binary = epmd
        self.epmd_port = free_port()
        self.nodename = f"cee-test-{self._port}@localhost"
        self._epmd: subprocess.Popen[bytes] | None = None
        self._epmd_guard: GroupGuard | None = None
        for sub in ("home", "mnesia", "log"):
            (self.dir / sub).mkdir()
        (self.dir / "rabbitmq.conf").write_text(_RABBITMQ_CONF + config)
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        if start:
            self.start()

    def url_for(self, vhost: str = "/") -> str:
        from urllib.parse import quote

        return f"amqp://guest:guest@{HOST}:{self._port}/{quote(vhost, safe='')}"

    @property
    def node_log_path(self) -> Path:
        return self.dir / "log" / f"{self.nodename}.log"

    def log_tail(self, lines: int = 40) -> str:
        return (
            f"--- {self.log_path.name}:\n{_tail(self.log_path, lines)}\n"
            f"--- {self.node_log_path.name}:\n{_tail(self.node_log_path, lines)}"
        )

    def env(self) -> dict[str, str]:
        """The environment for rabbitmq-server and rabbitmqctl on this node."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RABBITMQ_", "ERL_"))
        }
        base = self.dir
        env.update(
            {
                "HOME": str(base / "home"),
                "RABBITMQ_NODENAME": self.nodename,
                "RABBITMQ_NODE_IP_ADDRESS": HOST,
                "RABBITMQ_NODE_PORT": str(self._port),
                "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
                "RABBITMQ_LOG_BASE": str(base / "log"),
                "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
                "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
                "RABBITMQ_FEATURE_FLAGS_FILE": str(base / "feature_flags"),
                "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
                "ERL_EPMD_PORT": str(self.epmd_port),
                "ERL_EPMD_ADDRESS": HOST,
            }
        )
        return env

    def _start_epmd(self) -> None:
        if self._epmd is not None and self._epmd.poll() is None:
            return
        self._epmd = subprocess.Popen(
            [self.epmd_binary, "-port", str(self.epmd_port), "-address", HOST],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._epmd_guard = GroupGuard(self._epmd.pid)

        def listening() -> bool:
            if self._epmd is not None and self._epmd.poll() is not None:
                raise RuntimeError(f"epmd on port {self.epmd_port} exited")
            with socket.socket() as sock:
                return sock.connect_ex((HOST, self.epmd_port)) == 0

        wait_for(listening, 10, f"epmd not listening on port {self.epmd_port}")

    def _stop_epmd(self) -> None:
        if self._epmd is not None:
            reap_group(self._epmd, self._epmd_guard)
            self._epmd = self._epmd_guard = None

    def _accepts_guest(self) -> bool:
        import amqp

        connection = amqp.Connection(
            f"{HOST}:{self._port}", userid="guest", password="guest", connect_timeout=1.0
        )
        try:
            connection.connect()
        except Exception:
            return False
        finally:
            with contextlib.suppress(Exception):
                connection.close()
        return True

    def start(self) -> None:
        """Start (or restart) the node; return when guest can open an AMQP connection."""
        if self.running:
            return
        self._start_epmd()
        env = self.env()
        # A fresh distribution port each time: only the AMQP port must stay.
        env["RABBITMQ_DIST_PORT"] = str(free_port())
        env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] = "-kernel inet_dist_use_interface {127,0,0,1}"
        self._spawn([str(_RABBITMQ_SERVER)], env)
        deadline = time.monotonic() + self.startup_timeout
        while not self._accepts_guest():
            if self._died() or time.monotonic() > deadline:
                why = "exited" if self._died() else f"not ready after {self.startup_timeout:g}s"
                self._reap()
                raise RuntimeError(
                    f"rabbitmq-server {self.nodename} on port {self._port} {why}:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> None:
        """Shut the node down cleanly (SIGTERM), killing its process group if it lingers."""
        self._terminate(timeout)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._stop_epmd()

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run rabbitmqctl against this node (about a second per call: the CLI boots Erlang)."""
        result = subprocess.run(
            [str(_RABBITMQCTL), "-n", self.nodename, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )
        return result.stdout

    def add_vhost(self, vhost: str) -> str:
        """Create a vhost where guest has every permission; returns its broker URL."""
        self.ctl("add_vhost", vhost)
        self.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        return self.url_for(vhost)

    def delete_vhost(self, vhost: str) -> None:
        self.ctl("delete_vhost", vhost)

    def queues(self, vhost: str = "/") -> list[str]:
        """Names of the queues of a vhost (AMQP itself cannot list them)."""
        out = self.ctl("list_queues", "-q", "-p", vhost, "--formatter", "json", "name")
        return [row["name"] for row in json.loads(out or "[]")]

    def delete_queues(self, vhost: str = "/") -> list[str]:
        """Delete every queue of a vhost, so no message of an earlier test is consumed."""
        import amqp

        names = self.queues(vhost)
        if names:
            connection = amqp.Connection(
                f"{HOST}:{self._port}", userid="guest", password="guest", virtual_host=vhost
            )
            connection.connect()
            try:
                channel = connection.channel()
                for name in names:
                    channel.queue_delete(name)
            finally:
                connection.close()
        return names

    def __repr__(self) -> str:
        return f"RabbitMQServer(port={self._port}, node={self.nodename}, running={self.running})"


class SilentServer:
    """Accepts TCP connections and never answers: a broker that hangs."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.accepted.append(self.listener.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()
        for connection in self.accepted:
            connection.close()
