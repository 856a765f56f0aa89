"""The spec's validation rules and the monoid laws every aggregation must keep."""

from __future__ import annotations

import json
import random

import pytest

from lakehouse.errors import SpecError, ValidationError
from lakehouse.fraud import FRAUD_SPEC, TRANSACTIONS, USER_10M
from lakehouse.monoids import AGGREGATIONS, Count, Max, Min, Sum, SumOfSquares
from lakehouse.spec import FeatureView, empty_states, format_timestamp_ms, parse_timestamp_ms

GOOD = {
    "event_id": "e-1",
    "user_id": "u1",
    "merchant_id": "m1",
    "merchant_category": "grocery",
    "amount": 12.34,
    "currency": "EUR",
    "country": "DE",
    "channel": "pos",
    "event_time": "2026-01-01T00:00:01.250Z",
}


def reasons(document: object) -> list[str]:
    raw = document if isinstance(document, (bytes, str)) else json.dumps(document)
    with pytest.raises(ValidationError) as error:
        TRANSACTIONS.parse(raw)
    return error.value.reasons


def test_valid_event_is_typed() -> None:
    event = TRANSACTIONS.parse(json.dumps(GOOD).encode())
    assert event["amount"] == 1234  # integer cents
    assert event["event_time"] == 1767225601250  # epoch ms, UTC
    assert format_timestamp_ms(event["event_time"]) == GOOD["event_time"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"amount": "12.34"}, "wrong_type:amount"),
        ({"amount": True}, "wrong_type:amount"),
        ({"amount": 0}, "out_of_range:amount"),
        ({"amount": 1e9}, "out_of_range:amount"),
        ({"amount": 1.001}, "bad_money:amount"),
        ({"merchant_category": "weapons"}, "not_allowed:merchant_category"),
        ({"event_time": "2026-01-01 00:00:00"}, "bad_timestamp:event_time"),
        ({"event_time": "yesterday"}, "bad_timestamp:event_time"),
        ({"event_time": 1767225601250}, "wrong_type:event_time"),
        ({"user_id": "u" * 33}, "too_long:user_id"),
        ({"user_id": None}, "missing:user_id"),
        ({"coupon": "X"}, "unknown_field:coupon"),
    ],
)
def test_each_rule_names_its_reason(change: dict[str, object], expected: str) -> None:
    assert expected in reasons({**GOOD, **change})


def test_every_failure_is_reported_at_once() -> None:
    document = {k: v for k, v in GOOD.items() if k != "currency"}
    document.update(amount=-5, coupon=1)
    assert reasons(document) == ["out_of_range:amount", "missing:currency", "unknown_field:coupon"]


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b"[1, 2]", b"null", b"NaN"])
def test_malformed_payloads(raw: bytes) -> None:
    assert reasons(raw)[0].split(":")[0] in {"malformed_json", "not_an_object", "invalid_utf8"}


def test_nan_and_infinity_are_not_json_and_overflowing_numbers_are_out_of_range() -> None:
    # RFC 8259 has no NaN or Infinity literal; 1e400 is JSON but no finite number
    assert reasons(json.dumps(GOOD).replace("12.34", "NaN")) == ["malformed_json: NaN is not JSON"]
    assert reasons(json.dumps(GOOD).replace("12.34", "Infinity")) == ["malformed_json: Infinity is not JSON"]
    assert reasons(json.dumps(GOOD).replace("12.34", "1e400")) == ["out_of_range:amount"]


def test_timestamps_with_offsets_are_normalised_to_utc() -> None:
    assert parse_timestamp_ms("2026-01-01T01:00:00+01:00") == parse_timestamp_ms("2026-01-01T00:00:00Z")


# --- monoid laws -----------------------------------------------------------------------------

def _random_state(aggregation: object, rng: random.Random) -> object:
    if isinstance(aggregation, (Max, Min)) and rng.random() < 0.2:
        return None
    return rng.randint(-10**12, 10**12)


@pytest.mark.parametrize("aggregation", [Count(), Sum("amount"), SumOfSquares("amount"), Max("amount"), Min("amount")])
def test_monoid_laws(aggregation: object) -> None:
    rng = random.Random(7)
    plus = aggregation.plus  # type: ignore[attr-defined]
    zero = aggregation.zero  # type: ignore[attr-defined]
    for _ in range(500):
        a, b, c = (_random_state(aggregation, rng) for _ in range(3))
        assert plus(plus(a, b), c) == plus(a, plus(b, c))
        assert plus(a, b) == plus(b, a)
        assert plus(zero, a) == a == plus(a, zero)


def test_lift_and_sum_split_anywhere_equal_the_whole() -> None:
    rng = random.Random(3)
    events = [{"amount": rng.randint(1, 2_500_000)} for _ in range(1000)]
    for kind, cls in AGGREGATIONS.items():
        aggregation = cls(None if kind == "count" else "amount")
        whole = aggregation.sum(aggregation.lift(e) for e in events)
        cut = rng.randint(0, len(events))
        batch = aggregation.sum(aggregation.lift(e) for e in events[:cut])
        speed = aggregation.sum(aggregation.lift(e) for e in events[cut:])
        assert aggregation.plus(batch, speed) == whole, kind


# --- windows and the spec --------------------------------------------------------------------

def test_window_covers_the_buckets_ending_at_the_events_own() -> None:
    t = parse_timestamp_ms("2026-01-01T00:10:30Z")
    buckets = list(USER_10M.window_buckets_of(t))
    assert len(buckets) == 10
    assert buckets[-1] == USER_10M.bucket_of(t) == parse_timestamp_ms("2026-01-01T00:10:00Z")
    assert buckets[0] == parse_timestamp_ms("2026-01-01T00:01:00Z")


def test_feature_vector_of_an_event_with_no_history() -> None:
    event = TRANSACTIONS.parse(json.dumps(GOOD))
    vector = FRAUD_SPEC.features(empty_states(FRAUD_SPEC.views), event)
    assert len(vector) == len(FRAUD_SPEC.feature_names)
    named = dict(zip(FRAUD_SPEC.feature_names, vector, strict=True))
    assert named["user_count_10m"] == 0.0 and named["user_amount_zscore"] == 0.0
    assert named["risky_category"] == 0.0


def test_spec_rejects_inconsistent_declarations() -> None:
    with pytest.raises(SpecError):
        FeatureView("broken", "user_id", {"count": Count()}, bucket_ms=60_000)
    assert FRAUD_SPEC.topics == ("events", "labels", "events.dlq")
    assert len(FRAUD_SPEC.fingerprint()) == 16
