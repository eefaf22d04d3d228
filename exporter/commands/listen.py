"""Listening to the event stream for a while: what the ``events`` and ``check`` commands share.

They read the broker with the daemon's own receivers and pipeline, so they see
exactly what the daemon would, decoded and checked the same way (pickle is
never read). In place of the tracker, a ``Listener`` gets each valid event and
each dropped message.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from ..broker.transport import receiver_class
from ..config import Config
from ..health import Health
from ..telemetry.metrics import Metrics
from ..track.pipeline import Pipeline

T = TypeVar("T", int, float)

STOP_SECONDS = 1.0
"""How long the end waits for the receiver to close its connection."""
POLL_SECONDS = 0.1


class Listener(Protocol):
    """What the pipeline feeds: the tracker's interface, and the messages it drops."""

    def handle(self, event: dict[str, Any], arrival: float) -> None: ...

    def tick(self, now: float) -> None: ...

    def dropped(self, reason: str, detail: str) -> None: ...


class _Pipeline(Pipeline):
    """The daemon's pipeline, telling the listener (its tracker) of each dropped message."""

    tracker: Listener  # type: ignore[assignment]

    def dropped(self, reason: str, detail: str) -> None:
        self.tracker.dropped(reason, detail)


def listen(
    config: Config,
    listener: Listener,
    done: threading.Event,
    seconds: float | None = None,
    give_up: Callable[[Health], bool] | None = None,
) -> Health:
    """Feed ``listener`` until ``done`` is set (by it, or by SIGINT/SIGTERM), ``seconds``
    pass, or ``give_up(health)`` says so; the broker connection's story is in the result."""
    metrics = Metrics()
    health = Health(metrics, config.masked_broker_url())
    pipeline = _Pipeline(listener, health, metrics)  # type: ignore[arg-type]
    receiver = receiver_class(config.broker_url)(config, pipeline, health)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: done.set())
    # As in the daemon, a broker that never answers may hold the receiver in a
    # socket call: it gets a thread of its own, so the end need not wait for it.
    receiving = threading.Thread(target=receiver.run, name="receiver", daemon=True)
    receiving.start()
    deadline = None if seconds is None else time.monotonic() + seconds
    try:
        while not done.wait(POLL_SECONDS):
            if deadline is not None and time.monotonic() >= deadline:
                break
            if give_up is not None and give_up(health):
                break
            if not receiving.is_alive():  # only a bug ends it: its traceback is logged
                raise RuntimeError("the receiver stopped unexpectedly")
    finally:
        receiver.stop()
        receiving.join(STOP_SECONDS)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return health


def positive(convert: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type for the commands' counts and durations: above zero."""

    def parse(text: str) -> T:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
        return value

    return parse


def printable(text: str) -> str:
    """Text from the network made safe for a terminal: control characters escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
