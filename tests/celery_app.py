"""The Celery app of the test suite: real workers run it, tests publish with it.

Workers are started as ``celery -A tests.celery_app worker ...`` and find the
module-level ``app``, configured from the environment (``TEST_BROKER_URL``,
``TEST_SENT_EVENTS``, ``TEST_RESULT_BACKEND``). The test process builds its own apps with
``make_app(broker_url)`` and publishes by task name (``app.send_task``) or
through ``app.tasks["tests.add"].apply_async(...)``.

Task events stay off unless the worker gets ``-E`` (or the exporter's
``--enable-events`` turns them on), which is what the tests are about.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject

__all__ = ["HOSTILE_MESSAGE", "HOSTILE_NAME", "TASK_NAMES", "app", "make_app"]

HOSTILE_NAME = "tests.<script>window.owned = 1</script>"
"""A task name that is markup, for pages that must show it as text."""
HOSTILE_MESSAGE = '<img src="/nowhere" onerror="window.owned = 2">'

TASK_NAMES = (
    "tests.add",
    "tests.fail",
    "tests.fail_key",
    "tests.retry_then_succeed",
    "tests.retry_later",
    "tests.sleep",
    "tests.sleep_late",
    "tests.noop",
    "tests.reject",
    "tests.sleep_then_fail",
    HOSTILE_NAME,
)


def add(x: Any, y: Any) -> Any:
    return x + y


def fail(msg: str) -> None:
    raise ValueError(msg)


def fail_key() -> None:
    raise KeyError("missing")


def retry_then_succeed(self: Task, times: int) -> str:
    """Exactly ``times`` task-retried events (exception RuntimeError), then a success."""
    if self.request.retries < times:
        raise self.retry(countdown=0, max_retries=times, exc=RuntimeError("again"))
    return "ok"


def retry_later(self: Task, countdown: float) -> str:
    """Retried once with a countdown: held by the worker until its ETA, then a success."""
    if not self.request.retries:
        raise self.retry(countdown=countdown, max_retries=1, exc=RuntimeError("later"))
    return "ok"


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def noop() -> None:
    return None


def stamp(path: str) -> None:
    """Write the time it finished to ``path``: the truth a success's time is checked against."""
    Path(path).write_text(repr(time.time()))


def reject() -> None:
    """Refused by the task itself: task-failed (``reject requeue=False: …``), then task-rejected."""
    raise Reject(ValueError("unprocessable payload"), requeue=False)


def sleep_then_fail(seconds: float) -> None:
    time.sleep(seconds)
    raise TimeoutError(f"gave up after {seconds} s")


def hostile() -> None:
    """Fails with a message that is markup too."""
    raise ValueError(HOSTILE_MESSAGE)


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    return value.strip().lower() not in {"0", "false", "no", "off"}


def make_app(broker_url: str, sent_events: bool = True, result_backend: str = "") -> Celery:
    """A Celery app on ``broker_url`` with the test tasks registered.

    No result backend unless ``result_backend`` names one (with extended
    results: the worker and retries), where a test needs the workers' own
    account of a task to check the exporter's against.
    ``sent_events`` sets task_send_sent_event, so publishing emits task-sent.
    """
    celery = Celery("tests", broker=broker_url, set_as_current=False)
    celery.conf.update(
        result_backend=result_backend or None,
        result_extended=bool(result_backend),
        task_ignore_result=not result_backend,
        task_send_sent_event=sent_events,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        event_serializer="json",
    )
    celery.task(name="tests.add")(add)
    celery.task(name="tests.fail")(fail)
    celery.task(name="tests.fail_key")(fail_key)
    celery.task(name="tests.retry_then_succeed", bind=True)(retry_then_succeed)
    celery.task(name="tests.retry_later", bind=True)(retry_later)
    celery.task(name="tests.sleep")(sleep)
    # Acknowledged when done: with --prefetch-multiplier 1 a worker holds exactly as
    # many as it runs, so the rest of a burst waits in the broker, countable.
    celery.task(name="tests.sleep_late", acks_late=True)(sleep)
    celery.task(name="tests.noop")(noop)
    celery.task(name="tests.stamp")(stamp)
    celery.task(name="tests.reject", acks_late=True)(reject)
    celery.task(name="tests.sleep_then_fail")(sleep_then_fail)
    celery.task(name=HOSTILE_NAME)(hostile)
    return celery


app = make_app(
    os.environ.get("TEST_BROKER_URL", "memory://"),
    sent_events=_env_flag("TEST_SENT_EVENTS", True),
    result_backend=os.environ.get("TEST_RESULT_BACKEND", ""),
)
