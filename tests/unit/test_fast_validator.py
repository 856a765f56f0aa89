"""The compiled fast path (`lakehouse.fastparse`) against the reference routine
(`RecordSchema.inspect_slow`): for valid records, records with each kind of defect, random
mutations of valid documents and random bytes, `inspect` and `parse` answer exactly what the
reference answers (accept or refuse, the same typed values of the same types in the same
order, the same reasons in the same order, the same Inspection), and the fast path itself
never accepts what the reference refuses."""

from __future__ import annotations

import functools
import json
import math
import pickle
import random
from datetime import UTC
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lakehouse.errors import ValidationError
from lakehouse.fraud import CHARGEBACK_LABELS, TRANSACTIONS
from lakehouse.generator import GeneratorOptions, generate
from lakehouse.safejson import JsonLimits
from lakehouse.spec import UNCHECKED, FieldSpec, Inspection, RecordLimits, RecordSchema, parse_timestamp_ms

# A schema that exercises what the fraud spec does not: optional fields, long and double with
# bounds, a string without bounds, allowed values longer than max_length, a non-ASCII field
# name, a past-skew bound and tight JSON limits.
MIXED = RecordSchema(
    "mixed", "mixed", "id", "seq", "at",
    (
        FieldSpec("id", "string", max_length=8),
        FieldSpec("seq", "long", minimum=-5, maximum=2**62),
        FieldSpec("at", "timestamp"),
        FieldSpec("ratio", "double", required=False, minimum=-1.5, maximum=1e300),
        FieldSpec("price", "money", required=False),
        FieldSpec("flag", "boolean", required=False),
        FieldSpec("note", "string", required=False),
        FieldSpec("größe", "string", required=False, allowed=("S", "M", "XXL"), max_length=2),
        FieldSpec("n", "long", required=False),
    ),
    limits=RecordLimits(json=JsonLimits(max_bytes=400, max_depth=2, max_number_length=12),
                        max_future_skew_ms=60_000, max_past_skew_ms=86_400_000),
)
# Key and time fields that are not strings and timestamps.
NUMERIC = RecordSchema(
    "numeric", "numeric", "k", "k", "t",
    (FieldSpec("k", "long"), FieldSpec("t", "long"), FieldSpec("v", "double")),
)
SCHEMAS = [TRANSACTIONS, CHARGEBACK_LABELS, MIXED, NUMERIC]
SCHEMA = st.sampled_from(SCHEMAS)
ARRIVAL = parse_timestamp_ms("2026-01-01T00:00:02Z")


def _typed(values: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Values with their types and order (1 == 1.0 == True for ==; -0.0 == 0.0)."""
    return [(name, type(value).__name__, repr(value)) for name, value in values.items()]


def agree(schema: RecordSchema, raw: Any, key: Any = UNCHECKED, arrival_ms: Any = None) -> Inspection:
    """Asserts that inspect, parse and the fast path agree with the reference; returns it."""
    reference = schema.inspect_slow(raw, key=key, arrival_ms=arrival_ms)
    found = schema.inspect(raw, key=key, arrival_ms=arrival_ms)
    assert found == reference
    assert _typed(found.values) == _typed(reference.values)
    assert type(found.unknown_fields) is int and type(found.envelope_ok) is bool
    if reference.reasons:
        with pytest.raises(ValidationError) as refused:
            schema.parse(raw, key=key, arrival_ms=arrival_ms)
        assert refused.value.reasons == reference.reasons
    else:
        assert _typed(schema.parse(raw, key=key, arrival_ms=arrival_ms)) == _typed(reference.values)
    fast = schema._fast_path(raw, key, arrival_ms)
    if fast is not None:
        assert not reference.reasons, (raw, reference.reasons)
        assert _typed(fast) == _typed(reference.values)
    return reference


# --- strategies ------------------------------------------------------------------------------

NUMBER_LITERALS = st.from_regex(r"\A-?(0|[1-9][0-9]{0,24})(\.[0-9]{1,24})?([eE][-+]?[0-9]{1,3})?\Z") | st.sampled_from(
    ["-0", "-0.0", "0.00", "1e400", "-1e400", "1e-400", "NaN", "Infinity", "-Infinity", "01", "+1", ".5",
     "1.", "1e", "9223372036854775807", "9223372036854775808", "-9223372036854775809",
     "92233720368547758.07", "92233720368547758.08", "0.1000000000000000055511151231257827",
     "9999999999999.99", "10000000000000.01", "25000.00", "25000.001", "0.01", "0.009", "1" * 120]
)
HOSTILE = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
           | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
TIMESTAMP_TEXT = (
    st.datetimes(timezones=st.none() | st.timezones()).map(lambda d: d.isoformat())
    | st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat(timespec="milliseconds"))
    | st.from_regex(r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}(:[0-9]{2}(:[0-9]{2}([.,][0-9]{1,9})?)?)?)?"
                    r"(Z|z|[+-][0-9]{2}(:?[0-9]{2})?)?\Z")
    | st.sampled_from(["2026-01-01T00:00:01.250Z", "2026-01-02T00:00:03Z", "9999-12-31T23:59:59+00:00",
                       "0001-01-01T00:00:00+01:00", "2026-01-01T25:00:00Z", "2026-02-30T00:00:00Z"])
)


@functools.cache
def _valid_value(spec: FieldSpec) -> st.SearchStrategy[Any]:
    """Values that pass the field's rules (their JSON text for numbers and timestamps)."""
    if spec.type == "string":
        if spec.allowed:
            return st.sampled_from([v for v in spec.allowed if spec.max_length is None or len(v) <= spec.max_length])
        return st.text(min_size=1, max_size=spec.max_length or 20) | st.from_regex(r"\A[a-z0-9-]{1,8}\Z")
    if spec.type == "boolean":
        return st.booleans()
    if spec.type == "timestamp":
        return (st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat())
                | st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat(timespec="milliseconds")[:-6] + "Z")
                | st.just("2026-01-01T00:00:01.250Z")).map(json.dumps)
    low = -10**6 if spec.minimum is None else spec.minimum
    high = 10**6 if spec.maximum is None else min(spec.maximum, 10**15)
    if spec.type == "long":
        return st.integers(min_value=math.ceil(low), max_value=math.floor(high)).map(str)
    if spec.type == "money":
        cents = st.decimals(min_value=Decimal(str(low)), max_value=Decimal(str(high)), places=2)
        return (cents.map(lambda d: repr(float(d))) | cents.map(str) | cents.map(lambda d: f"{d:.2f}")
                | cents.map(lambda d: f"{d:e}") | st.integers(math.ceil(low), math.floor(high)).map(str))
    return (st.floats(min_value=low, max_value=high).map(repr)
            | st.integers(math.ceil(low), math.floor(high)).map(str))


@functools.cache
def _edge_value(spec: FieldSpec) -> st.SearchStrategy[Any]:
    """Values near or beyond the field's rules."""
    if spec.type == "string":
        return st.text(max_size=(spec.max_length or 20) + 2) | st.sampled_from([*(spec.allowed or ()), "", "x"])
    if spec.type == "boolean":
        return HOSTILE
    if spec.type == "timestamp":
        return (LITERAL, TIMESTAMP_TEXT.map(json.dumps))
    return (LITERAL, NUMBER_LITERALS)


LITERAL = "literal"  # a value already written as JSON text


@st.composite
def documents(draw: st.DrawFn, schema: RecordSchema) -> list[tuple[str, Any]]:
    """(name, value) pairs of a document: valid ones, with defects drawn per field at a rate
    of none, a few or many."""
    rate = draw(st.sampled_from([0, 8, 1]))  # odds of a valid field against each defect (0: none)
    rolls = st.sampled_from(["valid"] * 5 * rate + ["missing", "omit", "hostile", "null", "edge"])
    pairs: list[tuple[str, Any]] = []
    for spec in schema.fields:
        roll = draw(rolls) if rate else "valid"
        if roll == "valid" and not spec.required and draw(st.integers(0, 2)) == 0:
            roll = "omit"
        if roll == "missing" or roll == "omit" and not spec.required:
            continue
        if roll == "hostile":
            pairs.append((spec.name, draw(HOSTILE)))
        elif roll == "null":
            pairs.append((spec.name, (LITERAL, "null")))
        elif roll == "edge":
            edge = _edge_value(spec)
            pairs.append((spec.name, (LITERAL, draw(edge[1])) if isinstance(edge, tuple) else draw(edge)))
        else:
            value = draw(_valid_value(spec))
            pairs.append((spec.name, value if spec.type in ("string", "boolean") else (LITERAL, value)))
    if rate and draw(st.sampled_from(range(3 * rate))) == 0:  # unknown fields
        pairs += draw(st.lists(st.tuples(st.text(max_size=6), HOSTILE), min_size=1, max_size=3))
    if pairs and rate and draw(st.sampled_from(range(3 * rate))) == 0:  # a duplicate key
        name = draw(st.sampled_from([p[0] for p in pairs]))
        pairs.append((name, draw(st.sampled_from([p[1] for p in pairs]) | HOSTILE)))
    if draw(st.booleans()):
        pairs = draw(st.permutations(pairs))
    return pairs


def render(pairs: list[tuple[str, Any]], *, ascii_only: bool, item: str, colon: str, pad: str) -> str:
    def text(value: Any) -> str:
        if isinstance(value, tuple) and value and value[0] == LITERAL:
            return str(value[1])
        return json.dumps(value, ensure_ascii=ascii_only, allow_nan=True)
    body = item.join(f"{json.dumps(name, ensure_ascii=ascii_only)}{colon}{text(value)}" for name, value in pairs)
    return "{" + pad + body + pad + "}"


@st.composite
def raw_documents(draw: st.DrawFn, schema: RecordSchema) -> str:
    return render(draw(documents(schema)), ascii_only=draw(st.booleans()),
                  item=draw(st.sampled_from([",", ",", ", ", " ,\n", ",\t", ",\n    "])),
                  colon=draw(st.sampled_from([":", ":", ": ", " : "])),
                  pad=draw(st.sampled_from(["", "", " ", "\r\n"])))


@st.composite
def envelopes(draw: st.DrawFn, schema: RecordSchema, raw: str) -> tuple[Any, Any]:
    """A Kafka key and timestamp for a document: mostly the right ones, sometimes not."""
    try:
        document = json.loads(raw)
    except ValueError:
        document = None
    value = document.get(schema.key_field) if isinstance(document, dict) else None
    at = document.get(schema.time_field) if isinstance(document, dict) else None
    right = value if isinstance(value, str) else "u1"
    exact = right.encode("utf-8", "surrogatepass")
    try:
        event_ms = parse_timestamp_ms(at) if isinstance(at, str) else at
    except Exception:
        event_ms = None
    if not isinstance(event_ms, int) or isinstance(event_ms, bool):
        event_ms = ARRIVAL
    skew = schema.limits.max_future_skew_ms
    if draw(st.sampled_from([True, True, False])):  # as a producer and the broker give it
        return (draw(st.sampled_from([exact, right, UNCHECKED])),
                draw(st.sampled_from([event_ms, None, event_ms + 5, event_ms - skew])))
    key = draw(st.sampled_from([
        UNCHECKED, None, b"", "", right + "x", b"\xff", bytearray(exact), memoryview(exact),
    ]) | st.binary(max_size=4))
    arrival = draw(st.sampled_from([None, event_ms, event_ms - skew, event_ms - skew - 1,
                                    event_ms + 86_400_000, event_ms + 86_400_001])
                   | st.integers(min_value=-2**63, max_value=2**63 - 1))
    return key, arrival


def mutate(raw: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    for at, drop, insert in edits:
        at %= len(raw) + 1
        raw = raw[:at] + insert + raw[at + drop:]
    return raw


EDITS = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 3),
                           st.binary(max_size=3) | st.sampled_from([b'"', b"\\", b",", b"{", b"}", b"[", b":",
                                                                   b"0", b".", b"e", b"-", b" ", b"\x00",
                                                                   b"\xc3\xa4", b"\xed\xa0\x80", b"\\u0061"])),
                 min_size=1, max_size=4)
GENERAL = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))


# --- properties ------------------------------------------------------------------------------

@GENERAL
@given(st.data())
def test_records_with_and_without_defects(data: st.DataObject) -> None:
    schema = data.draw(SCHEMA)
    raw = data.draw(raw_documents(schema))
    key, arrival = data.draw(envelopes(schema, raw))
    agree(schema, raw.encode("utf-8", "surrogatepass"), key, arrival)
    agree(schema, raw, key, arrival)  # str in: encoded by the routine (a lone surrogate refused)


@GENERAL
@given(st.data())
def test_mutations_of_valid_documents(data: st.DataObject) -> None:
    schema = data.draw(SCHEMA)
    raw = data.draw(raw_documents(schema)).encode("utf-8", "surrogatepass")
    assume(raw.strip())
    mutated = mutate(raw, data.draw(EDITS))
    key, arrival = data.draw(envelopes(schema, raw.decode("utf-8", "replace")))
    agree(schema, mutated, key, arrival)
    agree(schema, bytearray(mutated), key, arrival)


@GENERAL
@given(SCHEMA, st.binary(max_size=600), st.sampled_from([UNCHECKED, None, b"u1"]), st.none() | st.integers())
def test_arbitrary_bytes(schema: RecordSchema, raw: bytes, key: Any, arrival: int | None) -> None:
    agree(schema, raw, key, arrival)


@GENERAL
@given(SCHEMA, st.text(max_size=300))
def test_arbitrary_text(schema: RecordSchema, raw: str) -> None:
    agree(schema, raw)


@settings(max_examples=1500, deadline=None)
@given(NUMBER_LITERALS | st.floats(allow_nan=False, allow_infinity=False).map(repr)
       | st.decimals(allow_nan=False, allow_infinity=False).map(str))
def test_money_and_numbers_as_any_literal(literal: str) -> None:
    raw = json.dumps({"event_id": "e", "user_id": "u1", "merchant_id": "m", "merchant_category": "fuel",
                      "currency": "EUR", "country": "DE", "channel": "pos", "amount": 0,
                      "event_time": "2026-01-01T00:00:01Z"}, separators=(",", ":")).replace('"amount":0',
                                                                                       '"amount":' + literal)
    agree(TRANSACTIONS, raw.encode())
    unbounded = {"id": "a", "seq": 1, "at": "2026-01-01T00:00:00Z"}
    for name in ("price", "ratio", "n"):
        agree(MIXED, json.dumps(unbounded)[:-1] + f', "{name}": {literal}}}')
    agree(NUMERIC, f'{{"k":1,"t":2,"v":{literal}}}'.encode())


# --- examples --------------------------------------------------------------------------------

GOOD = (b'{"event_id":"tx-1-0","user_id":"u332","merchant_id":"m75","merchant_category":"apparel",'
        b'"amount":47.00,"currency":"GBP","country":"GB","channel":"online",'
        b'"event_time":"2026-01-01T00:00:02.316Z"}')


@pytest.mark.parametrize("raw", [
    GOOD,
    GOOD.replace(b'"amount":47.00', b'"amount":47.00,"amount":47.00'),  # a duplicate key
    GOOD.replace(b'"amount":47.00', b'"amount":1,"amount":47.00'),
    GOOD.replace(b'"channel":"online"', b'"channel":"online","channel":"pos"'),
    GOOD.replace(b'"amount":47.00', b'"amount":47.00' + b"0" * 100),  # a number of 105 characters
    GOOD.replace(b'"amount":47.00', b'"amount":47.00' + b"0" * 95),  # exactly 100
    GOOD.replace(b'"amount":47.00', b'"amount":NaN'),
    GOOD.replace(b'"amount":47.00', b'"amount":1e400'),
    GOOD.replace(b'"amount":47.00', b'"amount":47.001'),
    GOOD.replace(b'"amount":47.00', b'"amount":4.7e1'),
    GOOD.replace(b'"u332"', b'"u\\u0033\\u00332"'),  # escapes: the reference reads them
    GOOD.replace(b'"u332"', b'"\\ud800"'),  # a lone surrogate
    GOOD.replace(b'"u332"', b'"u\xc3\xa4"'),  # non-ASCII
    GOOD.replace(b'"u332"', b'"u\xed\xa0\x80"'),  # an encoded surrogate: not UTF-8
    GOOD.replace(b'"m75"', b'"m\t75"'),  # a control character in a string
    b"\xef\xbb\xbf" + GOOD,  # a byte order mark
    GOOD + b" \n",
    GOOD + b"x",
    b" \t" + GOOD.replace(b",", b" , ").replace(b":", b" : "),
    GOOD.replace(b"}", b',"cvv":"123"}'),
    GOOD.replace(b'"event_time":"2026-01-01T00:00:02.316Z"', b'"event_time":"2026-01-01T00:00:02.316"'),
    GOOD.replace(b'"event_time":"2026-01-01T00:00:02.316Z"', b'"event_time":"2026-01-01T01:00:02.316+01:00"'),
    GOOD.replace(b'"event_time":"2026-01-01T00:00:02.316Z"', b'"event_time":"2026-01-01T00:00:02.3165Z"'),
    GOOD.replace(b'"currency":"GBP"', b'"currency":null'),
    GOOD.replace(b'"user_id":"u332",', b""),
    GOOD[:-1],
    b"",
    None,
])
@pytest.mark.parametrize("key", [UNCHECKED, b"u332", "u332", b"u333", b"", None, b"\xff", bytearray(b"u332")])
def test_edges_of_every_rule(raw: bytes | None, key: Any) -> None:
    for arrival in (None, ARRIVAL, ARRIVAL - 86_400_000, ARRIVAL + 10**9):
        agree(TRANSACTIONS, raw, key, arrival)
        agree(MIXED, raw, key, arrival)


def test_the_fast_path_takes_every_valid_generated_record() -> None:
    """The fast path is what answers a typical stream: every valid or late event and every
    label the shipped generator writes, with its Kafka envelope; everything else agrees."""
    schemas = {TRANSACTIONS.topic: TRANSACTIONS, CHARGEBACK_LABELS.topic: CHARGEBACK_LABELS}
    for message in generate(GeneratorOptions(events=1500, seed=5)):
        schema = schemas[message.topic]
        arrival = message.sent_ms
        found = agree(schema, message.value, message.key, arrival)
        if message.kind in ("valid", "late", "label"):
            assert not found.reasons
            assert schema._fast_path(message.value, message.key, arrival) is not None, message


def test_optional_fields_absent_null_or_present() -> None:
    base = '{"id": "a", "seq": 3, "at": "2026-01-01T00:00:00Z"'
    for extra in ["", ', "note": null', ', "flag": true', ', "flag": false, "n": -0', ', "größe": "M"',
                  ', "ratio": -0', ', "ratio": -0.0', ', "price": 12.5', ', "note": "ü"']:
        raw = (base + extra + "}").encode()
        assert not agree(MIXED, raw).reasons, extra
        assert MIXED._fast_path(raw, UNCHECKED, None) is not None, extra
    assert MIXED.parse(base + ', "ratio": -0}')["ratio"] == 0.0
    assert agree(MIXED, base + ', "größe": "XXL"}').reasons == ["too_long:größe"]  # allowed, too long


def test_a_schema_pickles_without_its_compiled_fast_path() -> None:
    assert TRANSACTIONS.parse(GOOD, key=b"u332")["amount"] == 4700  # compiled by now
    copy = pickle.loads(pickle.dumps(TRANSACTIONS))
    assert copy == TRANSACTIONS and "_fast_path" not in vars(copy)
    assert copy.parse(GOOD, key=b"u332") == TRANSACTIONS.parse(GOOD, key=b"u332")


def test_cents_of_any_double_as_the_reference_computes_them() -> None:
    """Money without bounds: a double's cents on the fast path are the reference's
    `Decimal(str(v)) * 100`, around the magnitude where the fast path stops (1e13)."""
    money = RecordSchema("money", "money", "id", "id", "at", (
        FieldSpec("id", "string"), FieldSpec("at", "timestamp"), FieldSpec("price", "money")))
    rng = random.Random(11)
    taken = 0
    for _ in range(4000):
        value = rng.choice([
            rng.randint(-10**8, 10**8) / 100, rng.randint(-10**15, 10**15) / 100,
            rng.randint(-10**17, 10**17) / 100, rng.uniform(-1e14, 1e14), rng.uniform(-1, 1),
            rng.randint(10**15 - 1000, 10**15 + 1000) / 100, float(rng.randint(-2**60, 2**60)),
        ])
        for literal in (repr(value), f"{value:.2f}", f"{value:e}"):
            raw = f'{{"id":"a","at":"2026-01-01T00:00:00Z","price":{literal}}}'.encode()
            agree(money, raw)
            taken += money._fast_path(raw, UNCHECKED, None) is not None
    assert taken > 4000  # the fast path took most of them
