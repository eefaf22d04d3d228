"""The hooks the tracker calls when traces are on: they fill in a task's spans from
its events and hand each finished one to the span queue.

The publisher sends ``task-sent`` after the message, so the worker's events
can come first: a publish that arrives while the execution runs still
becomes its parent; one that arrives after it ended is its sibling. A task
that a workflow's task published hangs below the execution that published
it. The state of the execution in progress lives in the tracker's task
record (``Task.trace``), so the task table's bound also bounds open spans.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping

from ..track.task import Event, Hook, Task
from .delivery import SpanQueue
from .metrics import Exemplars, Metrics
from .otel import SpanProcessor
from .sampling import (
    Sampling,
    execution_span_id,
    fold,
    hash128,
    root_trace_id,
    task_span_id,
    uuid_value,
)
from .spans import (
    ERROR,
    FAILURE,
    FINE,
    INCOMPLETE,
    INTERRUPTED,
    REJECTED,
    RETRY,
    REVOKED,
    SUCCESS,
    Outcome,
    Publish,
    SpanStatus,
    TaskTrace,
    count_retries,
    cut,
    exception_attributes,
    nanoseconds,
)

RECENT_RETRIED = 10_000
"""Tasks run more than once whose execution count is kept for their children's parent."""
_UNTRACED = False
"""``Task.trace`` of a task whose workflow is not sampled, or whose last execution
ended: falsy, as None (not seen yet) is, so that a hook tests ``not state`` once."""


class Spans:
    """Builds the spans of tasks from the tracker's hooks and hands them to a span processor."""

    def __init__(
        self,
        processor: SpanQueue | SpanProcessor,
        sample_ratio: float = 1.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.processor = processor
        self.sampling = Sampling(sample_ratio)
        self._attempts: OrderedDict[str, int] = OrderedDict()
        """Executions before the current one, of tasks that ran more than once."""
        self._runtime: Exemplars | None = None
        self._queue_wait: Exemplars | None = None
        if metrics is not None:
            self._runtime = metrics.exemplars_of("celery_task_runtime_seconds")
            self._queue_wait = metrics.exemplars_of("celery_task_queue_wait_seconds")

    def hooks(self) -> Mapping[str, Hook]:
        return {
            "task-sent": self._on_sent,
            "task-received": self._on_received,
            "task-started": self._on_started,
            "task-retried": self._on_retried,
            "task-succeeded": self._on_succeeded,
            "task-failed": self._on_failed,
            "task-rejected": self._on_rejected,
            "task-revoked": self._on_revoked,
        }

    def evicted(self, task: Task) -> None:
        """End a started execution where it started, marked incomplete, rather than leak it."""
        state = task.trace
        if state and state.start:
            task.trace = _UNTRACED
            self._emit(task, state, state.start, FINE, INCOMPLETE)

    def interrupted(self, task: Task, hostname: str) -> None:
        """The worker running the task was lost: end its execution span with an error."""
        state = task.trace
        if state and state.start:
            state.error_type = "WorkerLost"
            status = (ERROR, cut(f"worker lost: {hostname}"))
            self._emit(task, state, time.time_ns(), status, INTERRUPTED)
            task.trace = self._next(state, retried=False)

    def close(self) -> None:
        """Export what is queued, then stop the export thread."""
        self.processor.shutdown()

    # Hooks, one per event type; the task record is there, its trace state may not be.

    def _begin(self, task: Task, event: Event) -> TaskTrace | None:
        """The task's trace state from its first task-sent or task-received, if its
        workflow is sampled; None for an unsampled one, or a late event of a finished task."""
        state = None if task.done else self._trace(event)
        task.trace = state or _UNTRACED
        return state

    def _trace(self, event: Event) -> TaskTrace | None:
        """A trace state made from a task-sent or task-received, if its workflow is sampled."""
        uuid = event["uuid"]
        value = uuid_value(uuid)  # parsed once: most tasks are their workflow's root
        root_id = event.get("root_id")
        if root_id == uuid or not isinstance(root_id, str) or not root_id:
            trace_id = value or hash128(uuid)
        else:
            trace_id = root_trace_id(root_id)
        if not self.sampling.keeps(trace_id):
            return None
        state = TaskTrace(uuid, trace_id, fold(uuid, value), self.sampling)
        name = event.get("name")
        if isinstance(name, str) and name:
            state.task_name = cut(name)
        parent_id = event.get("parent_id")
        if isinstance(parent_id, str) and parent_id and parent_id != uuid:
            state.parent_span_id = execution_span_id(
                task_span_id(parent_id), self._attempts.get(parent_id, 0)
            )
        count_retries(state, event)
        return state

    def _on_sent(self, task: Task, event: Event) -> None:
        state = task.trace
        if state is None:
            state = self._begin(task, event)
        elif event.get("retries"):
            return  # a retry's publish: its executions stay under the first publish
        elif state is _UNTRACED:  # unsampled, or ended before its publish arrived:
            state = self._trace(event)  # the publish goes beside the exported execution
        elif state.parent_span_id == state.message_span_id:
            return  # published already
        if state is not None:
            queue = event.get("queue")
            state.queue = cut(queue) if isinstance(queue, str) and queue else task.queue
            state.task_name = state.task_name or task.name
            publish = Publish(state, state.parent_span_id, nanoseconds(event["timestamp"]))
            state.parent_span_id = state.message_span_id  # executions hang below the publish
            self.processor.on_end(publish)  # type: ignore[arg-type]  # see TaskTrace

    def _on_received(self, task: Task, event: Event) -> None:
        state = task.trace
        if state is None:  # the commonest case: named and counted by _trace
            state = self._begin(task, event)
            if state is not None:
                state.hostname = event["hostname"]
            return
        if not state:
            return
        if state.start:  # the next delivery (a retry's), while this execution runs
            retries = event.get("retries")
            if type(retries) is int and retries > state.next_retries:
                state.next_retries = retries
            return
        state.hostname = event["hostname"]
        if state.task_name is None and isinstance(event.get("name"), str):
            state.task_name = cut(event["name"])
        count_retries(state, event)

    def _on_started(self, task: Task, event: Event) -> None:
        state = task.trace
        if not state:
            return
        if state.start:  # the last execution has not ended: its task-retried may be late
            following = task.trace = self._next(state, retried=False)
            following.pending, state = state, following
        state.hostname = event["hostname"]
        timestamp = event["timestamp"]
        state.start = nanoseconds(timestamp)
        sent = task.sent
        ready = max(sent, task.eta or 0.0) if sent is not None else task.received
        if ready is not None:
            wait = state.queue_wait = max(0.0, timestamp - ready)
            if sent is not None and self._queue_wait is not None:  # as the tracker observed
                key = (task.name, task.queue)
                self._queue_wait.put(key, wait, state.trace_id, state.span_id, timestamp)

    def _on_retried(self, task: Task, event: Event) -> None:
        state = task.trace
        if not state:
            return
        # The worker sends task-retried when the pool reports the retry; by then the
        # retry's own delivery may have started: the retry ends the execution before,
        # by the time the next one began.
        pending = state.pending
        if pending is not None:
            state.pending = None
            pending.error = exception_attributes(event)
            pending.hostname = event["hostname"]
            self._emit(
                task, pending, min(nanoseconds(event["timestamp"]), state.start), FINE, RETRY
            )
        elif state.start:
            state.error = exception_attributes(event)
            self._end(task, state, event, FINE, RETRY)
            task.trace = self._next(state, retried=True)

    def _on_succeeded(self, task: Task, event: Event) -> None:
        state = task.trace
        if state:  # the commonest end: _end, inlined
            timestamp = event["timestamp"]
            if self._runtime is not None and state.start:
                runtime, key = max(0.0, event["runtime"]), (task.name, task.queue)
                self._runtime.put(key, runtime, state.trace_id, state.span_id, timestamp)
            task.trace = _UNTRACED
            state.hostname = event["hostname"]
            self._emit(task, state, nanoseconds(timestamp), FINE, SUCCESS)

    def _on_failed(self, task: Task, event: Event) -> None:
        state = task.trace
        if state:
            state.error = exception_attributes(event)
            state.error_type = str(state.error[0][1])
            status = (ERROR, str(state.error[1][1]))
            self._end(task, state, event, status, FAILURE, final=True)

    def _on_rejected(self, task: Task, event: Event) -> None:
        state = task.trace
        if state:
            self._end(task, state, event, FINE, REJECTED, final=True)

    def _on_revoked(self, task: Task, event: Event) -> None:
        state = task.trace
        if state:
            self._end(task, state, event, FINE, REVOKED, final=True)

    # Ending an execution.

    def _end(
        self,
        task: Task,
        state: TaskTrace,
        event: Event,
        status: SpanStatus,
        outcome: Outcome,
        final: bool = False,
    ) -> None:
        """End an execution at the event; a final one ends the task's trace state."""
        if final:
            task.trace = _UNTRACED
        state.hostname = event["hostname"]
        self._emit(task, state, nanoseconds(event["timestamp"]), status, outcome)

    def _next(self, state: TaskTrace, retried: bool) -> TaskTrace:
        """The next execution's record; its count is kept for tasks it may publish."""
        following = state.next_attempt(retried)
        attempts = self._attempts
        attempts[state.uuid] = following.attempt
        attempts.move_to_end(state.uuid)
        if len(attempts) > RECENT_RETRIED:
            attempts.popitem(last=False)
        return following

    def _emit(
        self, task: Task, state: TaskTrace, end: int, status: SpanStatus, outcome: Outcome
    ) -> None:
        """Hand a finished execution over; one that never started (revoked or rejected
        before it ran) is a span of no duration where it ended.

        An earlier execution whose end never came (its task-retried may come after
        the task's final event) ends where this one began: retried, when Celery
        counts this delivery as a retry of it; else incomplete, where it started.
        """
        pending = state.pending
        if pending is not None:
            state.pending = None
            if state.retries > pending.retries:
                self._emit(task, pending, state.start, FINE, RETRY)
            else:
                self._emit(task, pending, pending.start, FINE, INCOMPLETE)
        state.start = state.start or end
        state.end = max(end, state.start)
        state.status, state.outcome = status, outcome
        state.task_name = state.task_name or task.name
        state.queue = state.queue or task.queue
        self.processor.on_end(state)  # type: ignore[arg-type]  # see TaskTrace
