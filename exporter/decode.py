"""Turning broker message bodies into validated event dicts.

Everything on the event exchange is untrusted. Only JSON (and msgpack, when
installed) is ever decoded; pickle, YAML and anything else is refused by its
content type before a byte of it is parsed. Each event is checked against a
small schema so the tracker can read its fields without further checks.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Callable
from typing import Any

import orjson
import pybase64

try:
    import msgpack
except ImportError:  # msgpack is an optional extra
    msgpack = None

MAX_BODY_BYTES = 1 << 20
"""Celery's events are small (argument reprs are cut at 1 KiB); a body past
a megabyte is not an event stream."""
MAX_ID_LENGTH = 256
"""Task ids key the task table; Celery's are 36 characters, custom ones short."""

# Reasons for celery_exporter_events_invalid_total: a fixed, small set.
TOO_LARGE = "too_large"
CONTENT_TYPE = "content_type"
MALFORMED = "malformed"
NOT_AN_EVENT = "not_an_event"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
REASONS = (TOO_LARGE, CONTENT_TYPE, MALFORMED, NOT_AN_EVENT, MISSING_FIELD, WRONG_TYPE)


class InvalidMessage(Exception):
    """A whole message was dropped; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _load_msgpack(body: bytes) -> Any:
    return msgpack.unpackb(body, raw=False, strict_map_key=True)


LOADERS: dict[str, Callable[[bytes], Any]] = {"application/json": orjson.loads}
if msgpack is not None:
    LOADERS["application/x-msgpack"] = _load_msgpack

STR = (str,)
NUMBER = (int, float)
OPTIONAL_STR = (str, type(None))
OPTIONAL_NUMBER = (int, float, type(None))

# Fields the tracker reads, per event type: (field, accepted types, required).
# ``timestamp`` and ``hostname`` are checked for every event.
_TASK = (("uuid", STR, True),)
SCHEMA: dict[str, tuple[tuple[str, tuple[type, ...], bool], ...]] = {
    "task-sent": (*_TASK, ("name", STR, False), ("queue", OPTIONAL_STR, False),
                  ("eta", OPTIONAL_STR, False)),
    "task-received": (*_TASK, ("name", STR, False), ("eta", OPTIONAL_STR, False)),
    "task-started": _TASK,
    "task-succeeded": (*_TASK, ("runtime", NUMBER, True)),
    "task-failed": (*_TASK, ("exception", OPTIONAL_STR, False),
                    ("traceback", OPTIONAL_STR, False)),
    "task-retried": (*_TASK, ("exception", OPTIONAL_STR, False)),
    "task-rejected": _TASK,
    "task-revoked": _TASK,
    "worker-online": (),
    "worker-heartbeat": (("active", OPTIONAL_NUMBER, False),
                         ("processed", OPTIONAL_NUMBER, False)),
    "worker-offline": (),
}  # fmt: skip


_ALWAYS = (("timestamp", NUMBER, True), ("hostname", STR, True))
_CHECKS = {kind: _ALWAYS + fields for kind, fields in SCHEMA.items()}
_INF = float("inf")


# kombu writes the envelope with json.dumps in one fixed layout: base64 body first,
# content type third, ``body_encoding`` in the properties that close it. Parsing the
# whole envelope costs more than the event inside it, so that layout is read by
# slicing; anything else goes through the JSON parser. pybase64 decodes with SIMD, several
# times faster than binascii on the kilobytes of a batch.
_KOMBU_BODY = b'{"body": "'
_KOMBU_AFTER_BODY = re.compile(
    rb'", "content-encoding": "[^"\\]*", '
    rb'"content-type": "([^"\\]*)", "headers": \{'
)
_KOMBU_BASE64 = b'"body_encoding": "base64"'


def unwrap_redis_envelope(data: bytes) -> tuple[bytes, str]:
    """Body and content type from kombu's Redis envelope (JSON around the body)."""
    if len(data) > MAX_BODY_BYTES * 2:
        raise InvalidMessage(TOO_LARGE)
    if data.startswith(_KOMBU_BODY) and data.endswith(b'"}}'):
        end = data.find(b'"', len(_KOMBU_BODY))
        kombu = _KOMBU_AFTER_BODY.match(data, end)
        if kombu and data.rfind(_KOMBU_BASE64, kombu.end()) > 0:
            try:
                body = pybase64.b64decode(data[len(_KOMBU_BODY) : end], validate=True)
            except binascii.Error as exc:
                raise InvalidMessage(MALFORMED, str(exc)) from None
            return body, kombu[1].decode()
    try:
        envelope = orjson.loads(data)
        body = envelope["body"]
        content_type = envelope.get("content-type") or ""
        if type(content_type) is not str:
            raise TypeError(f"content-type {content_type!r}")
        properties = envelope.get("properties") or {}
        if properties.get("body_encoding") == "base64":
            return binascii.a2b_base64(body), content_type
        return body.encode(), content_type
    except ValueError as exc:  # JSON, base64 (a non-ASCII body too) and text errors alike
        raise InvalidMessage(MALFORMED, str(exc)) from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise InvalidMessage(MALFORMED, f"not a kombu envelope: {exc!r}") from None


def decode_body(body: bytes, content_type: str | None, limit: int = MAX_BODY_BYTES) -> list[Any]:
    """The events in a message body: a list for ``task.multi``, else one event."""
    if len(body) > limit:
        raise InvalidMessage(TOO_LARGE, f"{len(body)} bytes")
    loader = LOADERS.get(content_type or "")
    if loader is None:
        raise InvalidMessage(CONTENT_TYPE, repr(content_type))
    try:
        payload = loader(body)
    except Exception as exc:  # each loader has its own error classes; all mean the same
        raise InvalidMessage(MALFORMED, str(exc)) from None
    if type(payload) is list:
        return payload
    return [payload]


def check_event(event: Any) -> str | None:
    """None for a usable event, else the reason it is not."""
    if type(event) is not dict:
        return NOT_AN_EVENT
    kind = event.get("type")
    if type(kind) is not str:
        return MISSING_FIELD if kind is None else WRONG_TYPE
    for field, types, required in _CHECKS.get(kind, _ALWAYS):
        value = event.get(field)
        value_type = type(value)
        # The common case in one test; _check_field tells what is wrong otherwise.
        if value_type in types and (value_type is not float or -_INF < value < _INF):
            continue
        reason = _check_field(event, field, types, required)
        if reason:
            return reason
    uuid = event.get("uuid")
    if type(uuid) is str and len(uuid) > MAX_ID_LENGTH:
        return TOO_LARGE
    return None


def _check_field(event: dict, field: str, types: tuple[type, ...], required: bool) -> str | None:
    value = event.get(field)
    if value is None:
        if required or (field in event and type(None) not in types):
            return MISSING_FIELD if field not in event else WRONG_TYPE
        return None
    kind = type(value)
    if kind not in types:
        return WRONG_TYPE
    if kind is float and value - value != 0:  # NaN and infinities
        return WRONG_TYPE
    return None
