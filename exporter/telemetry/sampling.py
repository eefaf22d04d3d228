"""Which workflows are traced, and the ids their spans get.

Ids are derived, never generated, so that spans ending at different times,
or exported by two replicas, meet in one trace and find their parents:

- trace id: the 128-bit value of the workflow's ``root_id`` (the task's
  own uuid when it has none), or the first 128 bits of its BLAKE2b hash
  when the id is not a UUID;
- the publish's span id: the task's uuid with its two 64-bit halves XORed
  together (the first 64 bits of its BLAKE2b hash when it is not a UUID);
  the n-th execution's: that, XORed with n times a 64-bit odd constant;
- sampling: the trace id's low 56 bits against the threshold of the
  OpenTelemetry probability sampling specification, so a workflow is kept
  or dropped whole by every replica, and the threshold is recorded.
"""

from __future__ import annotations

from collections.abc import Mapping
from hashlib import blake2b

from ..config import ConfigError

SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
_RANGE56 = 1 << 56
_MASK56 = _RANGE56 - 1
_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15
"""Odd: n times it differs for every n below 2**64, so executions' span ids differ."""


class Sampling:
    """A sampling probability as the OpenTelemetry probability sampling specification
    records it: a rejection threshold on the trace id's low 56 bits (``ot=th:`` in the
    W3C trace state) and, for backends that read it, ``SampleRate`` (1 in N)."""

    def __init__(self, ratio: float) -> None:
        self.threshold = min(_RANGE56, max(0, round((1.0 - ratio) * _RANGE56)))
        self.everything = self.threshold == 0
        self.nothing = self.threshold == _RANGE56
        if self.everything or self.nothing:
            self.trace_state, self.attributes = "", ()
        else:
            digits = f"{self.threshold:014x}".rstrip("0")
            self.trace_state = f"ot=th:{digits}"
            rate = max(1, round(_RANGE56 / (_RANGE56 - self.threshold)))
            self.attributes = (("SampleRate", rate),)

    def keeps(self, trace_id: int) -> bool:
        return self.everything or (not self.nothing and trace_id & _MASK56 >= self.threshold)


def sampler_ratio(environ: Mapping[str, str], option: float) -> float:
    """The share of workflows kept: ``OTEL_TRACES_SAMPLER`` (and ``_ARG``) when set, else
    ``trace_sample_ratio``. A parent-based sampler is the same as its root's: the root
    task decides for its whole workflow."""
    text = environ.get("OTEL_TRACES_SAMPLER", "").strip()
    if not text:
        return option
    name = text.lower()
    if name not in SAMPLERS:
        raise ConfigError(
            f"otlp_traces: OTEL_TRACES_SAMPLER: expected one of {', '.join(SAMPLERS)}, got {text!r}"
        )
    if option != 1.0:
        raise ConfigError(
            "trace_sample_ratio: set it or OTEL_TRACES_SAMPLER, not both "
            f"(OTEL_TRACES_SAMPLER={text})"
        )
    base = name.removeprefix("parentbased_")
    if base != "traceidratio":
        return 1.0 if base == "always_on" else 0.0
    argument = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    try:
        ratio = float(argument) if argument else 1.0
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(
            f"otlp_traces: OTEL_TRACES_SAMPLER_ARG: expected a ratio from 0 to 1, got {argument!r}"
        )
    return ratio


def _hash64(text: str) -> int:
    return int.from_bytes(blake2b(_id_bytes(text), digest_size=8).digest())


def _id_bytes(text: str) -> bytes:
    """An id's bytes to hash; a lone surrogate in it passes as it is."""
    return text.encode("utf-8", "surrogatepass")


def uuid_value(text: str) -> int:
    """The 128 bits of a UUID in its usual form (what ``uuid.UUID(text).int`` gives, for
    less), else 0."""
    digits = text.replace("-", "")
    if len(digits) != 32 or len(text) != 36:
        return 0
    try:
        return int(digits, 16)
    except ValueError:
        return 0


def root_trace_id(root_id: str) -> int:
    return uuid_value(root_id) or hash128(root_id)


def hash128(text: str) -> int:
    return int.from_bytes(blake2b(_id_bytes(text), digest_size=16).digest())


def task_span_id(task_id: str) -> int:
    return fold(task_id, uuid_value(task_id))


def fold(task_id: str, value: int) -> int:
    """The task's span id from its uuid's ``value``: the two halves folded together,
    random for version 4 uuids, and distinct for time-based ones, whose low half is
    the same for a whole host."""
    return ((value >> 64) ^ (value & _MASK64) if value else _hash64(task_id)) or 1


def execution_span_id(message_span_id: int, attempt: int) -> int:
    """The span id of a task's execution number ``attempt`` (from 0)."""
    return (message_span_id ^ ((attempt + 1) * _GOLDEN64 & _MASK64)) or 1
