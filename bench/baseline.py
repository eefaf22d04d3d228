"""The baseline: Celery's own ``EventReceiver`` capturing into ``State``.

This is what most Celery monitors (Flower, celery-exporter) run per event.
The bench measures this process the same way as the exporter: CPU and
memory from ``/proc``, events from its count, which it prints as one
line each time a line arrives on stdin.

    python -m bench.baseline --broker-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

from celery import Celery


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline")
    parser.add_argument("--broker-url", required=True)
    parser.add_argument(
        "--max-tasks",
        type=int,
        default=100_000,
        help="State(max_tasks_in_memory=...): as many as the exporter tracks",
    )
    args = parser.parse_args(argv)

    app = Celery(broker=args.broker_url)
    state = app.events.State(max_tasks_in_memory=args.max_tasks, max_workers_in_memory=5000)
    count = 0

    def on_event(event: dict[str, Any]) -> None:
        nonlocal count
        state.event(event)
        count += 1

    def report() -> None:
        for _ in sys.stdin:
            print(count, flush=True)

    threading.Thread(target=report, daemon=True).start()
    while True:  # Redis drops a subscriber that falls behind: reconnect, as monitors do
        with app.connection_for_read() as connection:
            receiver = app.events.Receiver(connection, handlers={"*": on_event})
            try:
                receiver.capture(limit=None, timeout=None, wakeup=False)
            except connection.connection_errors:
                continue


if __name__ == "__main__":
    sys.exit(main())
