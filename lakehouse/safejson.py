"""JSON decoding that refuses, with a reason, whatever input would hurt a reader.

Python's `json.loads` raises `RecursionError` on deep nesting, `ValueError` on a number of
more than 4,300 digits, accepts `NaN` and `Infinity`, keeps the last of duplicate keys and
guesses UTF-16/32 from the bytes. Every layer that reads untrusted JSON (the speed layer, the
batch validation, the HTTP API) decodes through `decode` instead, which raises nothing but
`JsonRefused`, whatever the bytes:

    missing_value    no value at all (a Kafka tombstone)
    too_large        more than `max_bytes` bytes
    invalid_utf8     not UTF-8 (or, for text, a lone surrogate that UTF-8 cannot carry)
    too_deep         arrays/objects nested deeper than `max_depth`
    number_too_long  a number literal longer than `max_number_length` characters
    duplicate_key    an object names one key twice (the name is in `detail`)
    malformed_json   anything else that is not RFC 8259 JSON (NaN and Infinity included)
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


@dataclass(frozen=True)
class JsonLimits:
    """What a JSON document may be. The defaults fit any event a real producer sends."""

    max_bytes: int = 1_048_576
    max_depth: int = 32
    max_number_length: int = 100

    def __post_init__(self) -> None:
        if self.max_bytes < 2 or self.max_depth < 1 or self.max_number_length < 1:
            raise ValueError(f"JSON limits must be positive, got {self}")


class JsonRefused(Exception):
    """The document was refused; `rule` is one of the names in the module docstring."""

    def __init__(self, rule: str, detail: str = "") -> None:
        super().__init__(f"{rule}: {detail}" if detail else rule)
        self.rule = rule
        self.detail = detail


def decode(raw: bytes | bytearray | memoryview | str | None, limits: JsonLimits = JsonLimits()) -> Any:
    """The decoded document, or JsonRefused saying why not (never any other exception)."""
    if raw is None:
        raise JsonRefused("missing_value", "the record has no value (a tombstone)")
    if isinstance(raw, str):
        if len(raw) > limits.max_bytes:  # each character is at least one byte
            raise JsonRefused("too_large", f"more than {limits.max_bytes} bytes")
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError:
            raise JsonRefused("invalid_utf8", "a lone surrogate") from None
    size = len(raw)
    if size > limits.max_bytes:
        raise JsonRefused("too_large", f"{size} bytes > {limits.max_bytes}")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonRefused("invalid_utf8", f"byte {exc.start}") from None
    if text.count("[") + text.count("{") > limits.max_depth:
        depth = _max_depth(text)
        if depth > limits.max_depth:
            raise JsonRefused("too_deep", f"nested {depth} deep > {limits.max_depth}")
    try:
        return _decoder(limits).decode(text)
    except JsonRefused:
        raise
    except json.JSONDecodeError as exc:
        raise JsonRefused("malformed_json", f"{exc.msg} at {exc.pos}") from None
    except RecursionError:
        raise JsonRefused("too_deep", "nested too deep to decode") from None
    except (ValueError, TypeError, OverflowError, MemoryError) as exc:
        raise JsonRefused("malformed_json", type(exc).__name__) from None


def _max_depth(text: str) -> int:
    """Deepest nesting of brackets outside strings (an over-estimate for broken JSON, which
    is refused either way)."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub("", text)):
        if match.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


@functools.lru_cache(maxsize=16)
def _decoder(limits: JsonLimits) -> json.JSONDecoder:
    """One decoder per set of limits (built once, not per document: this is a hot path)."""
    return json.JSONDecoder(parse_int=_number(int, limits), parse_float=_number(float, limits),
                            parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)


def _number(kind: type, limits: JsonLimits) -> Any:
    def parse(literal: str) -> Any:
        if len(literal) > limits.max_number_length:
            raise JsonRefused("number_too_long", f"{len(literal)} characters > {limits.max_number_length}")
        return kind(literal)
    return parse


def _refuse_constant(literal: str) -> Any:
    raise JsonRefused("malformed_json", f"{literal} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JsonRefused("duplicate_key", key)
            seen.add(key)
    return document
