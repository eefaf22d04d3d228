"""Parsers of option values: each takes what a flag, a variable or the YAML file gives and
returns the value the configuration holds, or raises ``ValueError`` saying what it expected.

``config`` names one per option; the same text from a flag and the same value from YAML
parse alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from .track import hostnames
from .web import webconfig

Parser = Callable[[Any], Any]


def parse_text(value: Any) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError(f"expected text, got {value!r}")
    return str(value)


def integer(low: int, high: int | None = None) -> Parser:
    """A parser of whole numbers from ``low`` to ``high``, for options and variables alike."""

    def parse(value: Any) -> int:
        try:
            number = int(value) if not isinstance(value, bool | float) else None
        except (TypeError, ValueError):
            number = None
        if number is None or number < low or (high is not None and number > high):
            bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise ValueError(f"expected an integer {bounds}, got {value!r}")
        return number

    return parse


def parse_number(low: float = 0.0, high: float | None = None, *, exclusive: bool = False) -> Parser:
    """A parser of numbers from ``low`` to ``high``; ``exclusive``, strictly between them."""

    def parse(value: Any) -> float:
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        top = high if high is not None else float("inf")
        inside = number is not None and (low < number < top if exclusive else low <= number <= top)
        if not inside:
            if exclusive:
                below = f" and below {high:g}" if high is not None else ""
                bounds = f"above {low:g}{below}"
            else:
                bounds = f"from {low:g} to {high:g}" if high is not None else f"of at least {low:g}"
            raise ValueError(f"expected a number {bounds}, got {value!r}")
        return number

    return parse


def parse_boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def parse_choice(*choices: str) -> Parser:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return text

    return parse


def parse_items(value: Any) -> list[Any]:
    """A list from YAML, from repeated flags, or from comma-separated text."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, list | tuple):
        return [
            item
            for part in value
            for item in (parse_items(part) if isinstance(part, str) else [part])
        ]
    raise ValueError(f"expected a list, got {value!r}")


def parse_text_list(value: Any) -> tuple[str, ...]:
    return tuple(parse_text(item) for item in parse_items(value))


def parse_buckets(value: Any) -> tuple[float, ...]:
    bounds = [parse_number(low=1e-9)(item) for item in parse_items(value)]
    if not bounds or bounds != sorted(set(bounds)):
        raise ValueError(f"expected increasing positive numbers, got {value!r}")
    return tuple(bounds)


def parse_pairs(value: Any, convert: Callable[[str], Any]) -> dict[str, Any]:
    """A YAML mapping, repeated ``key=value`` flags, or text: a JSON object or
    comma-separated ``key=value`` items (from the environment)."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f"expected a JSON object, got {value!r}") from None
    if isinstance(value, Mapping):
        return {parse_text(key): item for key, item in value.items()}
    pairs = {}
    for item in value if isinstance(value, list | tuple) else parse_items(value):
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value, got {item!r}")
        pairs[key.strip()] = convert(text.strip())
    return pairs


def parse_glob(text: str) -> str:
    """A task name glob as ``fnmatch`` reads it. fnmatch takes any text, reading an
    unclosed ``[`` as a plain character: refused, as a mistake rather than a name."""
    if not text:
        raise ValueError("expected a glob of task names, got an empty one")
    start = text.find("[")
    while start >= 0:
        inner = start + 1 + (text[start + 1 : start + 2] == "!")
        inner += text[inner : inner + 1] == "]"  # a leading ] belongs to the set
        end = text.find("]", inner)
        if end < 0:
            raise ValueError("not a glob: a '[' is never closed")
        start = text.find("[", end + 1)
    return text


def parse_task_globs(parse_value: Parser) -> Parser:
    """GLOB=VALUE pairs in the order given (the first glob a task name matches wins)."""

    def parse(value: Any) -> dict[str, Any]:
        globs = {}
        for glob, item in parse_pairs(value, str).items():
            try:
                globs[parse_glob(glob)] = parse_value(item)
            except ValueError as exc:
                raise ValueError(f"{glob!r}: {exc}" if glob else str(exc)) from None
        return globs

    return parse


def parse_json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_labels(value: Any) -> dict[str, str]:
    labels = {key: parse_text(item) for key, item in parse_pairs(value, str).items()}
    for key in labels:
        if not key.isidentifier() or key.startswith("__"):
            raise ValueError(f"{key!r} is not a valid Prometheus label name")
    return labels


def parse_options(value: Any) -> dict[str, Any]:
    return parse_pairs(value, parse_json_or_text)


def parse_web_config_file(value: Any) -> str:
    """The path, once the file loads: its mistakes stop the start like any other."""
    path = parse_text(value)
    if path:
        webconfig.load(path)
    return path


def parse_rewrites(value: Any) -> tuple[hostnames.Rewrite, ...]:
    """Rules from YAML (a mapping of ``pattern`` and ``replacement``, or a list of them), from
    repeated ``PATTERN=REPLACEMENT`` flags, or from the environment (JSON, or one rule as
    text). Split at the last ``=``, since a pattern may hold one and a replacement needs none."""
    if isinstance(value, str) and value.lstrip().startswith(("{", "[")):
        value = parse_json_or_text(value)  # a pattern may start with a bracket too
    rules = []
    for item in value if isinstance(value, list | tuple) else [value]:
        if isinstance(item, Mapping) and set(item) == {"pattern", "replacement"}:
            pattern, replacement = parse_text(item["pattern"]), parse_text(item["replacement"])
        elif isinstance(item, str) and "=" in item:
            pattern, _, replacement = item.rpartition("=")
        else:
            raise ValueError(f"expected pattern and replacement, got {item!r}")
        rules.append(hostnames.compile_rewrite(pattern, replacement))
    return tuple(rules)
