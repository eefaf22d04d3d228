"""Decoding message bodies: what is accepted, and why the rest is refused."""

from __future__ import annotations

import base64
import pickle

import msgpack
import orjson
import pytest

from exporter import decode
from tests.events import heartbeat, succeeded


def test_a_single_event_and_a_batch_decode_to_lists() -> None:
    one = succeeded("u1", 10.0, 0.5)
    assert decode.decode_body(orjson.dumps(one), "application/json") == [one]
    batch = [succeeded(f"u{i}", 10.0, 0.5) for i in range(24)]
    assert decode.decode_body(orjson.dumps(batch), "application/json") == batch


def test_msgpack_bodies_decode() -> None:
    one = heartbeat("celery@w1", 10.0)
    assert decode.decode_body(msgpack.packb(one), "application/x-msgpack") == [one]


@pytest.mark.parametrize(
    "content_type",
    [
        "application/x-python-serialize",
        "application/x-yaml",
        "text/plain",
        None,
        "",
    ],
)
def test_other_content_types_are_refused_unread(content_type: str | None) -> None:
    body = pickle.dumps({"type": "task-succeeded"})
    with pytest.raises(decode.InvalidMessage) as caught:
        decode.decode_body(body, content_type)
    assert caught.value.reason == decode.CONTENT_TYPE


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe\x00", b"[" * 5000 + b"]" * 5000])
def test_unparsable_bodies_are_malformed(body: bytes) -> None:
    with pytest.raises(decode.InvalidMessage) as caught:
        decode.decode_body(body, "application/json")
    assert caught.value.reason == decode.MALFORMED


def test_bodies_past_a_megabyte_are_refused() -> None:
    body = orjson.dumps({"type": "task-sent", "pad": "x" * decode.MAX_BODY_BYTES})
    with pytest.raises(decode.InvalidMessage) as caught:
        decode.decode_body(body, "application/json")
    assert caught.value.reason == decode.TOO_LARGE


def test_redis_envelope_with_base64_body() -> None:
    event = succeeded("u1", 10.0, 0.5)
    envelope = orjson.dumps(
        {
            "body": base64.b64encode(orjson.dumps([event])).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {},
            "properties": {
                "body_encoding": "base64",
                "delivery_tag": "x",
                "delivery_info": {"exchange": "celeryev", "routing_key": "task.multi"},
            },
        }
    )
    body, content_type = decode.unwrap_redis_envelope(envelope)
    assert content_type == "application/json"
    assert decode.decode_body(body, content_type) == [event]


@pytest.mark.parametrize("data", [b"[]", b'{"no": "body"}', b"garbage", b'{"body": 5}'])
def test_broken_redis_envelopes_are_malformed(data: bytes) -> None:
    with pytest.raises(decode.InvalidMessage) as caught:
        decode.unwrap_redis_envelope(data)
    assert caught.value.reason == decode.MALFORMED


def _without(event: dict, field: str) -> dict:
    return {key: value for key, value in event.items() if key != field}


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (succeeded("u1", 10.0, 0.5), None),
        (heartbeat("celery@w1", 10.0), None),
        ({"type": "custom-event", "timestamp": 1.0, "hostname": "h"}, None),
        ("task-succeeded", decode.NOT_AN_EVENT),
        ([succeeded("u1", 10.0, 0.5)], decode.NOT_AN_EVENT),
        (_without(succeeded("u1", 10.0, 0.5), "type"), decode.MISSING_FIELD),
        ({**succeeded("u1", 10.0, 0.5), "type": 7}, decode.WRONG_TYPE),
        (_without(succeeded("u1", 10.0, 0.5), "timestamp"), decode.MISSING_FIELD),
        ({**succeeded("u1", 10.0, 0.5), "timestamp": "noon"}, decode.WRONG_TYPE),
        ({**succeeded("u1", 10.0, 0.5), "timestamp": float("nan")}, decode.WRONG_TYPE),
        (_without(succeeded("u1", 10.0, 0.5), "hostname"), decode.MISSING_FIELD),
        ({**succeeded("u1", 10.0, 0.5), "uuid": 42}, decode.WRONG_TYPE),
        ({**succeeded("u1", 10.0, 0.5), "runtime": None}, decode.WRONG_TYPE),
        ({**succeeded("u1", 10.0, 0.5), "runtime": "1.5"}, decode.WRONG_TYPE),
        ({**succeeded("u1", 10.0, 0.5), "runtime": True}, decode.WRONG_TYPE),
        (_without(succeeded("u1", 10.0, 0.5), "runtime"), decode.MISSING_FIELD),
        ({**heartbeat("celery@w1", 10.0), "active": "3"}, decode.WRONG_TYPE),
    ],
)
def test_event_checks(event: object, reason: str | None) -> None:
    assert decode.check_event(event) == reason
