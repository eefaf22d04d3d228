"""The task table set right by the workers' own view of their work.

The table knows only the events the exporter received: after a restart of
the exporter it knows nothing of the tasks already running, and a lost final
event leaves a task running in it forever. Celery's ``active``, ``reserved``
and ``scheduled`` inspect commands list what each worker runs, holds in its
prefetch buffer and holds for an ETA; each inspect round brings them here.

Events and replies travel apart, so a reply may be built before the event of
a task that just started or just finished reaches the exporter. A round is
therefore judged ``SETTLE_SECONDS`` after its replies arrived, against what
the table was before the round's broadcast (``InFlight``, taken then):

- a task the table had running on a worker before the broadcast, that the
  worker's reply does not list and that still runs in the table once the
  round settled, had its final event lost: it leaves the running figures
  (``finished_unseen``);
- a task a worker runs that the table still does not know as running joins
  the running figures under its real name and queue, from its real start
  (``running_unseen``);
- the same for tasks waiting in a worker, prefetched or held for an ETA
  (``waiting_unseen``), and for waiting tasks the worker no longer holds
  (``left_unseen``).

Replies are untrusted like events: what is not of the expected shape is
counted and left out, names and queues go through the label limits, start
times are never later than now, and adopted tasks live in the bounded table.
A worker that did not answer every command of a round is not judged by it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from ..decode import MAX_ID_LENGTH, MISSING_FIELD, TOO_LARGE, WRONG_TYPE
from .task import UNKNOWN, Task, eta_timestamp

if TYPE_CHECKING:
    from .tracker import Tracker

SETTLE_SECONDS = 3.0
"""How long a round waits for events still on their way: longer than the tracker
holds the events of a task not yet named (2 s)."""
MAX_REQUESTS = 10_000
"""Tasks read from one command's reply of one worker; the rest are left out."""
FINISHED_UNSEEN, RUNNING_UNSEEN = "finished_unseen", "running_unseen"
WAITING_UNSEEN, LEFT_UNSEEN = "waiting_unseen", "left_unseen"
REASONS = (FINISHED_UNSEEN, RUNNING_UNSEEN, WAITING_UNSEEN, LEFT_UNSEEN)
"""``celery_exporter_tasks_reconciled_total`` reasons."""
ACTIVE, RESERVED, SCHEDULED = "active", "reserved", "scheduled"
COMMANDS = (ACTIVE, RESERVED, SCHEDULED)


class Request(NamedTuple):
    """One task as a worker lists it."""

    uuid: str
    name: str | None
    queue: str | None
    started: float | None  # time_start, the worker's clock (active tasks)
    eta: float | None  # scheduled tasks


@dataclass(slots=True)
class WorkerView:
    """What one worker said it runs and holds, filled as its replies arrive."""

    active: list[Request] = field(default_factory=list)
    waiting: list[Request] = field(default_factory=list)
    answered: set[str] = field(default_factory=set)


@dataclass(slots=True)
class InFlight:
    """The table's running and waiting tasks per worker, before a round's broadcast."""

    running: dict[str, dict[str, float | None]]
    """Per worker, each running task's start, to tell a later execution apart."""
    waiting: dict[str, set[str]]

    @classmethod
    def of(cls, tracker: Tracker) -> InFlight:
        """Read from the inspect thread: each copy is one operation in C, under the GIL."""
        running: dict[str, dict[str, float | None]] = {}
        for tasks in list(tracker.running.values()):
            for uuid, task in list(tasks.items()):
                if task.worker is not None:
                    running.setdefault(task.worker, {})[uuid] = task.started
        waiting: dict[str, set[str]] = {}
        for uuid, task in list(tracker.tasks.items()):
            hostname = task.prefetched_on or task.scheduled_on
            if hostname is not None:
                waiting.setdefault(hostname, set()).add(uuid)
        return cls(running, waiting)


def requests(reply: Any, invalid: Callable[[str], None], *, scheduled: bool) -> list[Request]:
    """The tasks of one worker's reply to ``active``, ``reserved`` or ``scheduled``;
    what is not of Celery's shape is counted by ``invalid`` and left out."""
    if type(reply) is not list:
        invalid(WRONG_TYPE)
        return []
    if len(reply) > MAX_REQUESTS:
        invalid(TOO_LARGE)
        reply = reply[:MAX_REQUESTS]
    found = []
    for item in reply:
        eta = None
        if scheduled:  # {"eta": ..., "priority": ..., "request": {...}}
            if type(item) is not dict:
                invalid(WRONG_TYPE)
                continue
            text = item.get("eta")
            eta = eta_timestamp(text) if type(text) is str else None
            item = item.get("request")
        request = _request(item, eta)
        if request is None:
            invalid(MISSING_FIELD)
        else:
            found.append(request)
    return found


def _request(info: Any, eta: float | None) -> Request | None:
    if type(info) is not dict:
        return None
    uuid = info.get("id")
    if type(uuid) is not str or not uuid or len(uuid) > MAX_ID_LENGTH:
        return None
    name = info.get("name")
    delivery = info.get("delivery_info")
    queue = delivery.get("routing_key") if type(delivery) is dict else None
    started = info.get("time_start")
    started = float(started) if type(started) in (int, float) else None
    return Request(
        uuid,
        name if type(name) is str and name else None,
        queue if type(queue) is str and queue else None,
        started if started is not None and math.isfinite(started) and started > 0 else None,
        eta,
    )


@dataclass(slots=True)
class Reconciliation:
    """One inspect round's view of the workers that answered it, due at ``due``."""

    due: float
    before: InFlight
    views: Mapping[str, WorkerView]

    def apply(self, tracker: Tracker, now: float) -> None:
        """Correct the table by each worker's view; on the event thread, at the tick."""
        counts = dict.fromkeys(REASONS, 0)
        for hostname, view in self.views.items():
            if len(view.answered) < len(COMMANDS):
                continue  # a partial answer proves nothing missing
            listed = {request.uuid for request in (*view.active, *view.waiting)}
            counts[FINISHED_UNSEEN] += _finished(
                tracker, hostname, self.before.running.get(hostname, {}), listed
            )
            counts[LEFT_UNSEEN] += _left(
                tracker, hostname, self.before.waiting.get(hostname, ()), listed
            )
            for request in view.active:
                counts[RUNNING_UNSEEN] += _running(tracker, hostname, request, now)
            for request in view.waiting:
                counts[WAITING_UNSEEN] += _waiting(tracker, hostname, request, now)
        for reason, count in counts.items():
            if count:
                tracker.reconciled.inc((reason,), count)


def _finished(
    tracker: Tracker, hostname: str, before: Mapping[str, float | None], listed: set[str]
) -> int:
    """Stop the tasks whose worker no longer runs them though the table still does."""
    count = 0
    for uuid, started in before.items():
        task = tracker.tasks.get(uuid)
        if (
            uuid not in listed
            and task is not None
            and task.running is not None
            and task.worker == hostname
            and task.started == started  # the same execution, not a later one
        ):
            tracker.stop_running(uuid, task)
            if tracker.spans is not None:
                tracker.spans.evicted(task)  # its end is unknown: ended incomplete
            count += 1
    return count


def _left(tracker: Tracker, hostname: str, before: Iterable[str], listed: set[str]) -> int:
    count = 0
    for uuid in before:
        task = tracker.tasks.get(uuid)
        if (
            uuid not in listed
            and task is not None
            and hostname
            in (
                task.prefetched_on,
                task.scheduled_on,
            )
        ):
            tracker.unprefetch(task)
            count += 1
    return count


def _running(tracker: Tracker, hostname: str, request: Request, now: float) -> int:
    task = _unseen(tracker, request)
    if task is None or task.running is not None:
        return 0
    started = min(request.started or now, now)
    tracker.adopt_running(request.uuid, task, hostname, started)
    return 1


def _waiting(tracker: Tracker, hostname: str, request: Request, now: float) -> int:
    task = _unseen(tracker, request)
    if task is None or task.running is not None or task.prefetched_on or task.scheduled_on:
        return 0
    if request.eta is not None and request.eta > now:
        task.eta = request.eta
        tracker.schedule(task, request.uuid, hostname, request.eta)
    else:
        tracker.prefetch(task, hostname)
    return 1


def _unseen(tracker: Tracker, request: Request) -> Task | None:
    """The task's record, made and named from the request if the table lacks it; None
    when its events decide: it finished, or its events wait for its name."""
    uuid = request.uuid
    if tracker.is_held(uuid) or tracker.finished(uuid):
        return None
    task = tracker.tasks.get(uuid)
    if task is None:
        task = tracker.track(uuid)
    if task.name == UNKNOWN:
        tracker.name_from_worker(task, request.name, request.queue)
    return task
