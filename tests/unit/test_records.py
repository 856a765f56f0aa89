"""The one validation routine against any input: `RecordSchema.inspect`/`parse` raise nothing
but ValidationError whatever the bytes, name each violation with its own reason, and
accept only records every layer can store."""

from __future__ import annotations

import json
import time
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lakehouse.errors import ValidationError
from lakehouse.fraud import CHARGEBACK_LABELS, TRANSACTIONS
from lakehouse.generator import GeneratorOptions, generate
from lakehouse.safejson import JsonLimits
from lakehouse.spec import FieldSpec, RecordLimits, RecordSchema, parse_timestamp_ms
from lakehouse.types import typed_arrow_schema

GOOD = {
    "event_id": "e-1", "user_id": "u1", "merchant_id": "m1", "merchant_category": "grocery",
    "amount": 12.34, "currency": "EUR", "country": "DE", "channel": "pos",
    "event_time": "2026-01-01T00:00:01.250Z",
}
GOOD_BYTES = json.dumps(GOOD).encode()
ARRIVAL = parse_timestamp_ms("2026-01-01T00:00:02Z")
DAY_MS = 86_400_000


def reasons(raw: Any, **envelope: Any) -> list[str]:
    with pytest.raises(ValidationError) as refused:
        TRANSACTIONS.parse(raw, **envelope)
    return refused.value.reasons


POISON = [
    pytest.param(b"[" * 5000, ["too_deep"], id="deep-nesting"),
    pytest.param(b'{"event_id": "e", "amount": ' + b"9" * 5000 + b"}", ["number_too_long"], id="5000-digits"),
    pytest.param(b"9" * 5000, ["number_too_long"], id="5000-digit-scalar"),
    pytest.param(b'{"event_id": "\xff\xfe"}', ["invalid_utf8"], id="invalid-utf8"),
    pytest.param(b"\x00" + GOOD_BYTES, ["malformed_json: Expecting value at 0"], id="nul-byte"),
    pytest.param(b" " * (10 * 1024 * 1024), ["too_large"], id="10MB"),
    pytest.param(b"[1, 2]", ["not_an_object"], id="array"),
    pytest.param(b'"text"', ["not_an_object"], id="scalar"),
    pytest.param(b'{"event_id": "a", "event_id": "b"}', ["duplicate_key:event_id"], id="duplicate-keys"),
    pytest.param(None, ["missing_value"], id="tombstone"),
    pytest.param(b"", ["malformed_json: Expecting value at 0"], id="empty"),
    pytest.param(json.dumps({**GOOD, "user_id": "\ud800"}).encode(), ["invalid_string:user_id"], id="lone-surrogate"),
]


@pytest.mark.parametrize(("raw", "expected"), POISON)
def test_each_poison_payload_has_its_own_reason(raw: bytes | None, expected: list[str]) -> None:
    assert reasons(raw) == expected
    assert TRANSACTIONS.inspect(raw).reasons == expected


def test_limits_are_spec_settings() -> None:
    strict = RecordSchema(TRANSACTIONS.name, TRANSACTIONS.topic, TRANSACTIONS.key_field,
                          TRANSACTIONS.id_field, TRANSACTIONS.time_field, TRANSACTIONS.fields,
                          limits=RecordLimits(json=JsonLimits(max_bytes=400, max_depth=1, max_number_length=3)))
    with pytest.raises(ValidationError, match="too_large"):
        strict.parse(GOOD_BYTES + b" " * 400)
    with pytest.raises(ValidationError, match="number_too_long"):
        strict.parse(json.dumps({**GOOD, "amount": 1234}))
    with pytest.raises(ValidationError, match="too_deep"):
        strict.parse(json.dumps({"event_id": {"a": 1}}))
    assert TRANSACTIONS.parse(json.dumps({**GOOD, "amount": 1234}))["amount"] == 123400


def test_integers_beyond_64_bits_are_refused_not_an_overflow_later() -> None:
    assert reasons(json.dumps({**GOOD, "amount": 10**30})) == ["out_of_range:amount"]  # bounded
    assert TRANSACTIONS.inspect(json.dumps({**GOOD, "amount": 10**30})).values["amount"] == 2**63 - 1
    unbounded = RecordSchema("counter", "counters", "id", "id", "at", (
        FieldSpec("id", "string"), FieldSpec("at", "timestamp"), FieldSpec("n", "long")))
    row = {"id": "a", "at": "2026-01-01T00:00:00Z"}
    assert unbounded.parse(json.dumps({**row, "n": 2**63 - 1}))["n"] == 2**63 - 1
    with pytest.raises(ValidationError) as refused:
        unbounded.parse(json.dumps({**row, "n": 2**63}))
    assert refused.value.reasons == ["unrepresentable:n"]


def test_reasons_quote_names_briefly() -> None:
    many = {**GOOD, **{f"x{i}": 1 for i in range(50)}, "y" * 1000: 1}
    found = reasons(json.dumps(many))
    assert len(found) == 9 and found[-1] == "unknown_field:+43 more"
    assert all(len(r) < 100 for r in found)


# --- the Kafka envelope: key and time --------------------------------------------------------

def test_the_kafka_key_must_equal_the_key_field() -> None:
    assert TRANSACTIONS.parse(GOOD_BYTES, key=b"u1")["user_id"] == "u1"
    assert TRANSACTIONS.parse(GOOD_BYTES, key="u1")["user_id"] == "u1"
    assert reasons(GOOD_BYTES, key=b"u2") == ["key_mismatch:user_id"]
    assert reasons(GOOD_BYTES, key=b"\xff") == ["key_mismatch:user_id"]
    assert reasons(GOOD_BYTES, key=None) == ["missing_key:user_id"]
    assert reasons(GOOD_BYTES, key=b"") == ["missing_key:user_id"]
    inspected = TRANSACTIONS.inspect(GOOD_BYTES, key=b"u2")
    assert inspected.is_object and not inspected.envelope_ok


def test_event_time_far_ahead_of_its_arrival_is_out_of_range_time() -> None:
    late_arrival = ARRIVAL + 30 * DAY_MS  # a replay or a late event: no lower bound by default
    assert TRANSACTIONS.parse(GOOD_BYTES, arrival_ms=late_arrival)["amount"] == 1234
    ahead = json.dumps({**GOOD, "event_time": "2026-01-02T00:00:03Z"})
    assert reasons(ahead, arrival_ms=ARRIVAL) == ["out_of_range_time:event_time"]
    almost = json.dumps({**GOOD, "event_time": "2026-01-02T00:00:01Z"})  # within the day
    assert TRANSACTIONS.parse(almost, arrival_ms=ARRIVAL)
    far = json.dumps({**GOOD, "event_time": "9999-12-31T23:59:59Z"})
    assert reasons(far, arrival_ms=ARRIVAL) == ["out_of_range_time:event_time"]
    bounded = RecordSchema(TRANSACTIONS.name, TRANSACTIONS.topic, TRANSACTIONS.key_field,
                           TRANSACTIONS.id_field, TRANSACTIONS.time_field, TRANSACTIONS.fields,
                           limits=RecordLimits(max_past_skew_ms=DAY_MS))
    with pytest.raises(ValidationError, match="out_of_range_time"):
        bounded.parse(GOOD_BYTES, arrival_ms=late_arrival)


def test_the_shipped_generator_passes_the_default_limits_with_its_kafka_envelope() -> None:
    now_ms = int(time.time() * 1000)  # the broker stamps messages when they are produced
    schemas = {TRANSACTIONS.topic: TRANSACTIONS, CHARGEBACK_LABELS.topic: CHARGEBACK_LABELS}
    messages = list(generate(GeneratorOptions(events=2000, seed=3)))
    valid = [m for m in messages if m.kind in ("valid", "late", "label")]
    assert len(valid) > 3000
    for message in valid:
        schemas[message.topic].parse(message.value, key=message.key, arrival_ms=now_ms)


# --- any input -------------------------------------------------------------------------------

def _accepted_values_fit_the_tables(schema: RecordSchema, raw: Any) -> None:
    """inspect never raises; an accepted record's typed values fit the Arrow/Delta columns
    both layers write; parse raises ValidationError exactly when inspect has reasons."""
    inspected = schema.inspect(raw)
    if inspected.reasons:
        with pytest.raises(ValidationError):
            schema.parse(raw)
        return
    typed = schema.parse(raw)
    arrow = typed_arrow_schema(schema)
    for field in schema.fields:
        value = typed[field.name]
        if field.type == "timestamp" and value is not None:
            value *= 1000
        pa.array([value], type=arrow.field(field.name).type)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_arbitrary_bytes(raw: bytes) -> None:
    _accepted_values_fit_the_tables(TRANSACTIONS, raw)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=600, deadline=None)
@given(JSON_VALUES)
def test_arbitrary_json(document: Any) -> None:
    _accepted_values_fit_the_tables(TRANSACTIONS, json.dumps(document).encode())


def _field_values() -> dict[str, st.SearchStrategy[Any]]:
    """Each field: a mix of plausible and hostile values."""
    hostile = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70) \
        | st.lists(st.integers(), max_size=2)
    out: dict[str, st.SearchStrategy[Any]] = {}
    for field in TRANSACTIONS.fields:
        if field.allowed:
            plausible: st.SearchStrategy[Any] = st.sampled_from(field.allowed)
        elif field.type == "money":
            plausible = st.decimals(min_value=-1, max_value=30_000, places=2).map(float) | st.integers()
        elif field.type == "timestamp":
            plausible = st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat())
        else:
            plausible = st.text(max_size=40)
        out[field.name] = plausible | hostile
    return out


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries(_field_values()), st.binary(max_size=8) | st.none(),
       st.integers(min_value=-2**63, max_value=2**63 - 1))
def test_arbitrary_records_with_arbitrary_envelopes(document: dict[str, Any], key: bytes | None,
                                                    arrival_ms: int) -> None:
    raw = json.dumps(document, allow_nan=True).encode()
    inspected = TRANSACTIONS.inspect(raw, key=key, arrival_ms=arrival_ms)
    if not inspected.reasons:
        typed = TRANSACTIONS.parse(raw, key=key, arrival_ms=arrival_ms)
        assert key is not None and key.decode() == typed["user_id"]
        assert typed["event_time"] - arrival_ms <= DAY_MS
