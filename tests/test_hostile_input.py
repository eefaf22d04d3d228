"""Whatever arrives on the event exchange, the daemon drops what is broken and carries on.

Two halves: hypothesis throws generated bodies and events at the decoder,
the checks and the tracker in this process (nothing raises, every event is
counted exactly once, as valid or by its reason); then a fixed set of
hostile messages goes through real Redis and RabbitMQ servers, and the
invalid counts per reason must come out exact.
"""

from __future__ import annotations

import base64
import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from kombu import Connection, Exchange, Producer

from exporter import decode
from exporter.health import Health
from exporter.telemetry.metrics import Metrics
from exporter.track.pipeline import UNPROCESSABLE, Pipeline
from exporter.track.tracker import HOLD_SECONDS, Tracker
from tests.events import heartbeat, received, sent, started, succeeded
from tests.harness import InProcessExporter
from tests.servers import wait_for

INVALID = "celery_exporter_events_invalid_total"
EVENTS = "celery_exporter_events_total"
ARRIVAL = 1_700_000_000.0
REDIS_DB = 7  # a database of its own: no other test's worker publishes here

# What the decoders can produce: JSON and msgpack stop at 64-bit integers.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
anything = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
field = (
    anything
    | st.text(max_size=400)
    | st.floats(-1e12, 1e12)
    | st.sampled_from(
        [
            "2024-05-01T12:00:00",
            "2024-05-01T12:00:00+02:00",
            "0001-01-01T00:00:00+23:59",
            "not a date",
            "",
        ]
    )
)
KINDS = [*decode.SCHEMA, "task-custom", "worker-custom"]


def events_of(field: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Event-shaped dicts: known keys, any values, small pools so events meet."""
    return st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(KINDS) | field,
            "timestamp": st.floats(0, 2e9) | field,
            "hostname": st.sampled_from(["celery@a", "celery@b"]) | field,
            "uuid": st.sampled_from(["t1", "t2", "t3"]) | field,
            "name": st.sampled_from(["app.add", "app.mul"]) | field,
            "queue": field,
            "eta": field,
            "runtime": field,
            "exception": field,
            "active": field,
            "processed": field,
            "sw_ident": field,
            "sw_ver": field,
        },
    )


event_like = events_of(field)
# msgpack adds what JSON cannot carry: bytes, NaN and infinities.
msgpack_event_like = events_of(field | st.binary(max_size=8) | st.floats())
batch = st.lists(event_like | anything, max_size=12)


class Rig:
    """A pipeline into a real tracker, with small limits so they are reached."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.health = Health(self.metrics, "memory://")
        self.tracker = Tracker(
            self.metrics,
            max_tracked_tasks=2,
            default_queue="celery",
            worker_timeout=30.0,
            purge_offline_after=60.0,
            max_label_values=3,
        )
        self.pipeline = Pipeline(self.tracker, self.health, self.metrics)

    def total(self, name: str) -> float:
        return sum(self.metrics.counter(name).values.values())

    def invalid(self, reason: str) -> float:
        return self.metrics.counter(INVALID).get((reason,))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch)
def test_every_event_of_a_batch_is_counted_once(events: list[Any]) -> None:
    rig = Rig()
    rig.pipeline.on_body(orjson.dumps(events), "application/json", ARRIVAL)
    assert rig.invalid(UNPROCESSABLE) == 0
    assert rig.total(INVALID) + rig.total(EVENTS) == len(events)
    valid = [event for event in events if decode.check_event(event) is None]
    assert rig.total(EVENTS) == len(valid)
    assert len(rig.tracker.tasks) <= 2
    assert all(
        value >= 0 for value in rig.metrics.gauge("celery_worker_tasks_prefetched").values.values()
    )


@settings(max_examples=300, deadline=None)
@given(
    st.lists(msgpack_event_like | anything, max_size=30),
    st.lists(st.floats(0, 4e9), min_size=1, max_size=5),
)
def test_checked_events_never_break_the_tracker(events: list[Any], arrivals: list[float]) -> None:
    """``check_event`` is the tracker's whole contract: what passes it must not raise."""
    rig = Rig()
    events = decode.decode_body(msgpack.packb(events), "application/x-msgpack")
    for index, event in enumerate(events):
        if decode.check_event(event) is None:
            arrival = arrivals[index % len(arrivals)]
            rig.tracker.handle(event, arrival)
            rig.tracker.tick(arrival)


@settings(max_examples=500, deadline=None)
@given(
    st.binary(max_size=300) | anything.map(orjson.dumps) | anything.map(msgpack.packb),
    st.sampled_from(
        [
            "application/json",
            "application/x-msgpack",
            "application/x-python-serialize",
            "application/x-yaml",
            "",
            None,
        ]
    ),
)
def test_any_bytes_decode_or_are_refused_with_a_reason(
    body: bytes, content_type: str | None
) -> None:
    try:
        events = decode.decode_body(body, content_type)
    except decode.InvalidMessage as exc:
        assert exc.reason in decode.REASONS
    else:
        assert type(events) is list
        for event in events:
            assert decode.check_event(event) in (None, *decode.REASONS)


envelope_like = st.fixed_dictionaries(
    {},
    optional={
        "body": anything | st.binary().map(lambda b: base64.b64encode(b).decode()),
        "content-type": anything | st.sampled_from(["application/json", "application/x-yaml"]),
        "properties": anything | st.just({"body_encoding": "base64"}),
    },
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | envelope_like.map(orjson.dumps) | anything.map(orjson.dumps))
@example(b'{"body":"\xc2\x80","properties":{"body_encoding":"base64"}}')  # not ASCII
def test_any_redis_envelope_is_handled(data: bytes) -> None:
    rig = Rig()
    rig.pipeline.on_envelope(data, ARRIVAL)
    assert rig.invalid(UNPROCESSABLE) == 0


# Hostile messages for the real brokers: (body, content type, expected reason or None).


def pickle_trap(path: Path) -> bytes:
    """A pickle whose loading creates ``path``: proof, if the file appears, of unpickling."""

    class Trap:
        def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
            return open, (str(path), "w")

    return pickle.dumps(Trap())


def event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "timestamp": ARRIVAL, "hostname": "celery@hostile", **fields}


def hostile_messages(trap: Path) -> list[tuple[bytes, str | None, str | None]]:
    json_type = "application/json"
    return [
        (b"{not json", json_type, decode.MALFORMED),
        (b'{"type": "task-sent", "name": "\xff\xfe"}', json_type, decode.MALFORMED),
        (b"[" * 100_000 + b"]" * 100_000, json_type, decode.MALFORMED),
        (b'"just a string"', json_type, decode.NOT_AN_EVENT),
        (b"42", json_type, decode.NOT_AN_EVENT),
        (orjson.dumps({"timestamp": ARRIVAL, "hostname": "h"}), json_type, decode.MISSING_FIELD),
        (orjson.dumps(event("task-started", uuid=12345)), json_type, decode.WRONG_TYPE),
        (
            orjson.dumps(event("task-succeeded", uuid="u1", runtime=None)),
            json_type,
            decode.WRONG_TYPE,
        ),
        (
            orjson.dumps(event("task-succeeded", uuid="u1", runtime="fast")),
            json_type,
            decode.WRONG_TYPE,
        ),
        (
            orjson.dumps({"type": "task-started", "hostname": "h", "uuid": "u1"}),
            json_type,
            decode.MISSING_FIELD,
        ),
        (orjson.dumps(event("task-started", uuid="u" * 100_000)), json_type, decode.TOO_LARGE),
        (
            orjson.dumps(event("task-sent", uuid="u2", pad="x" * (1 << 20))),
            json_type,
            decode.TOO_LARGE,
        ),
        (pickle_trap(trap), "application/x-python-serialize", decode.CONTENT_TYPE),
        (
            b"!!python/object/apply:os.system ['touch /tmp/pwned']",
            "application/x-yaml",
            decode.CONTENT_TYPE,
        ),
        (orjson.dumps(event("task-started", uuid="u3")), None, decode.CONTENT_TYPE),
        # Valid events, one with a huge name (truncated into a label, not refused).
        (orjson.dumps(event("task-received", uuid="u4", name="n" * 500_000)), json_type, None),
        (msgpack.packb(event("task-started", uuid="u4")), "application/x-msgpack", None),
    ]


# A batch mixing valid and invalid events: the valid ones still count.
MIXED_BATCH = [
    event("task-started", uuid="m1"),
    "not an event",
    event("task-started"),
    event("task-succeeded", uuid="m1", runtime=0.25),
    event("task-revoked", uuid=7),
]
MIXED_INVALID = {decode.NOT_AN_EVENT: 1, decode.MISSING_FIELD: 1, decode.WRONG_TYPE: 1}


def expected_counts(messages: list[tuple[bytes, str | None, str | None]]) -> dict[str, int]:
    counts = dict.fromkeys(decode.REASONS, 0)
    for _, _, reason in messages:
        if reason:
            counts[reason] += 1
    for reason, count in MIXED_INVALID.items():
        counts[reason] += count
    return counts


def redis_envelope(body: bytes, content_type: str | None) -> bytes:
    """A message as kombu PUBLISHes it on Redis."""
    return orjson.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "binary",
            "content-type": content_type,
            "headers": {},
            "properties": {
                "body_encoding": "base64",
                "delivery_info": {"exchange": "celeryev", "routing_key": "task.multi"},
                "priority": 0,
            },
        }
    )


def publish_to_redis(url: str) -> Callable[[bytes, str | None], None]:
    client = redis.Redis.from_url(url)
    channel = f"/{REDIS_DB}.celeryev/task.multi"
    return lambda body, content_type: client.publish(channel, redis_envelope(body, content_type))


def publish_to_amqp(url: str) -> Callable[[bytes, str | None], None]:
    connection = Connection(url)
    producer = Producer(connection.channel(), exchange=Exchange("celeryev", type="topic"))
    return lambda body, content_type: producer.publish(
        body,
        routing_key="task.multi",
        content_type=content_type,
        content_encoding="binary",
        serializer=None if content_type else "raw",
    )


def run_hostile_messages(broker_url: str, publish_to: Callable[..., Any], tmp_path: Path) -> None:
    exporter = InProcessExporter(["--broker-url", broker_url])
    try:
        wait_for(
            lambda: exporter.sample("celery_exporter_broker_connected") == 1,
            15,
            "the exporter did not connect",
        )
        trap = tmp_path / "unpickled"
        messages = hostile_messages(trap)
        publish = publish_to(broker_url)
        for body, content_type, _ in messages:
            publish(body, content_type)
        publish(orjson.dumps(MIXED_BATCH), "application/json")

        expected = expected_counts(messages)
        total = sum(expected.values())
        wait_for(
            lambda: exporter.total(INVALID) == total, 15, f"invalid count did not reach {total}"
        )
        # The valid ones: two from the list, two from the mixed batch.
        wait_for(lambda: exporter.total(EVENTS) == 4, 15, "the valid events were not counted")
        counts = {reason: exporter.sample(INVALID, {"reason": reason}) for reason in decode.REASONS}
        assert counts == expected
        assert exporter.sample(INVALID, {"reason": UNPROCESSABLE}) == 0
        # An unseen task's events wait a moment for the event that names it.
        wait_for(
            lambda: (
                exporter.sample(
                    "celery_task_succeeded_total",
                    {"name": "unknown", "hostname": "celery@hostile", "queue": "celery"},
                )
                == 1
            ),
            HOLD_SECONDS + 5,
            "the unseen task's success was not counted",
        )
        long_name = "n" * 200  # labels are cut at 200 characters
        assert (
            exporter.sample(
                "celery_task_started_total",
                {"name": long_name, "hostname": "celery@hostile", "queue": "celery"},
            )
            == 1
        )
        assert not trap.exists(), "a pickle body was unpickled"
        assert exporter.sample("celery_exporter_broker_connected") == 1
        assert exporter.daemon.health.alive()
    finally:
        exporter.stop()
    # The trap is armed: loading it really would have created the file.
    proof = tmp_path / "proof"
    pickle.loads(pickle_trap(proof))
    assert proof.exists()


def test_hostile_messages_through_redis(redis_server, tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/{REDIS_DB}"
    run_hostile_messages(url, publish_to_redis, tmp_path)


def test_hostile_messages_through_rabbitmq(rabbitmq_server, tmp_path: Path) -> None:
    run_hostile_messages(rabbitmq_server.url, publish_to_amqp, tmp_path)


def test_one_log_line_per_reason_per_minute(caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig()
    with caplog.at_level("WARNING", logger="exporter.track.pipeline"):
        for _ in range(50):
            rig.pipeline.on_body(b"{not json", "application/json", ARRIVAL)
            rig.pipeline.on_body(b"[1, 2]", "application/json", ARRIVAL)
            rig.pipeline.on_body(b"x", "application/x-yaml", ARRIVAL)
    assert rig.invalid(decode.MALFORMED) == 50
    assert rig.invalid(decode.NOT_AN_EVENT) == 100
    assert rig.invalid(decode.CONTENT_TYPE) == 50
    reasons = sorted(record.getMessage().split("(")[1].split(")")[0] for record in caplog.records)
    assert reasons == [decode.CONTENT_TYPE, decode.MALFORMED, decode.NOT_AN_EVENT]


def test_real_celery_events_pass_the_checks() -> None:
    """The generators above must not have drifted from what Celery sends."""
    for one in (
        sent("a", "app.add", "q", 1.0),
        received("a", "app.add", 1.0),
        started("a", 1.0),
        succeeded("a", 1.0, 0.1),
        heartbeat("celery@w", 1.0),
    ):
        assert decode.check_event(json.loads(orjson.dumps(one))) is None
