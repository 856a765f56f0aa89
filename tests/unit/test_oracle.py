"""The test oracle against numbers worked out by hand: states per bucket, windows (with their
edges), point-in-time states in arrival order, and the fraud model inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from lakehouse.errors import SpecError
from lakehouse.fraud import FRAUD_SPEC
from lakehouse.monoids import Count, Max, Min, Sum, SumOfSquares
from lakehouse.spec import FeatureView
from tests.oracle import (
    empty_states,
    fraud_model_inputs,
    kafka_arrival,
    point_in_time_states,
    states_by_view,
    view_states,
    window_states,
)

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a minute boundary
MIN = 60_000
AGGREGATIONS = {"n": Count(), "total": Sum("amount"), "sq": SumOfSquares("amount"),
                "top": Max("amount"), "low": Min("amount")}
WINDOWED = FeatureView("w3", "user_id", AGGREGATIONS, bucket_ms=MIN, window_buckets=3)
ALL = FeatureView("all", "user_id", AGGREGATIONS)


def event(name: str, user: str, at_ms: int, amount: int) -> dict[str, Any]:
    return {"event_id": name, "user_id": user, "event_time": at_ms, "amount": amount}


EVENTS = [  # in arrival order
    event("e1", "u1", T0 + 10_000, 500),
    event("e2", "u1", T0 + 50_000, 300),
    event("e3", "u2", T0 + 70_000, 1000),
    event("e4", "u1", T0 + 2 * MIN + 5_000, 200),
    event("e5", "u1", T0 + 3 * MIN + 1_000, 700),
    event("e6", "u1", T0 + 30_000, 100),  # late: back in the first minute
    event("e7", "u1", T0 + 4 * MIN - 1, 50),  # the last millisecond of the fourth minute
]


def s(n: int, total: int, sq: int, top: int | None, low: int | None) -> dict[str, Any]:
    return {"n": n, "total": total, "sq": sq, "top": top, "low": low}


NOTHING = s(0, 0, 0, None, None)


def test_states_per_entity_and_bucket() -> None:
    assert view_states(WINDOWED, EVENTS, "event_time") == {
        ("u1", T0): s(3, 900, 250_000 + 90_000 + 10_000, 500, 100),  # e1 e2 e6
        ("u2", T0 + MIN): s(1, 1000, 1_000_000, 1000, 1000),
        ("u1", T0 + 2 * MIN): s(1, 200, 40_000, 200, 200),
        ("u1", T0 + 3 * MIN): s(2, 750, 490_000 + 2_500, 700, 50),  # e5 e7
    }
    assert states_by_view([WINDOWED, ALL], EVENTS, "event_time")["all"] == {
        ("u1", 0): s(6, 1850, 882_500, 700, 50),
        ("u2", 0): s(1, 1000, 1_000_000, 1000, 1000),
    }
    assert view_states(ALL, [], "event_time") == {}


def test_window_edges() -> None:
    table = view_states(WINDOWED, EVENTS, "event_time")
    # minute 3's window is minutes 1..3: u1's minutes 2 and 3
    assert window_states(WINDOWED, table, "u1", T0 + 4 * MIN - 1) == s(3, 950, 532_500, 700, 50)
    # minute 4's window is minutes 2..4 (bucket(e) - 3 < bucket(x)): still both
    assert window_states(WINDOWED, table, "u1", T0 + 4 * MIN) == s(3, 950, 532_500, 700, 50)
    # minute 5's window is minutes 3..5: minute 2 has left
    assert window_states(WINDOWED, table, "u1", T0 + 5 * MIN) == s(2, 750, 492_500, 700, 50)
    # minute 2's window is minutes 0..2: a later bucket (minute 3) is never in it
    assert window_states(WINDOWED, table, "u1", T0 + 2 * MIN) == s(4, 1100, 390_000, 500, 100)
    assert window_states(WINDOWED, table, "u1", T0 + 7 * MIN) == NOTHING
    assert window_states(WINDOWED, table, "nobody", T0) == NOTHING
    everything = view_states(ALL, EVENTS, "event_time")
    assert window_states(ALL, everything, "u2", 0) == s(1, 1000, 1_000_000, 1000, 1000)


def test_point_in_time_states_see_only_earlier_arrivals_in_their_window() -> None:
    seen = point_in_time_states([WINDOWED, ALL], EVENTS, "event_time")
    assert [x["w3"] for x in seen] == [
        NOTHING,                                   # e1: nothing before it
        s(1, 500, 250_000, 500, 500),              # e2: e1
        NOTHING,                                   # e3: another user
        s(2, 800, 340_000, 500, 300),              # e4 (minute 2): e1 e2 (minute 0)
        s(1, 200, 40_000, 200, 200),               # e5 (minute 3): e4; minute 0 has left
        s(2, 800, 340_000, 500, 300),              # e6 (late, minute 0): e1 e2, not the later e4 e5
        s(2, 900, 530_000, 700, 200),              # e7 (minute 3): e4 e5; not e6 (minute 0)
    ]
    assert seen[6]["all"] == s(5, 1800, 880_000, 700, 100)  # every earlier u1 event, e6 included
    assert seen[5]["all"] == s(4, 1700, 870_000, 700, 200)
    assert seen[2]["all"] == NOTHING


def test_arrival_is_by_offset_for_the_key_entity_and_by_time_for_others() -> None:
    merchant = FRAUD_SPEC.view("merchant_all")
    user = FRAUD_SPEC.view("user_all")
    common = {"merchant_id": "m1", "merchant_category": "grocery", "channel": "pos"}
    a = {**common, "user_id": "u1", "event_time": T0 + 2_000, "amount": 300,
         "partition": 0, "offset": 5}
    b = {**common, "user_id": "u2", "event_time": T0 + 1_000, "amount": 100,
         "partition": 1, "offset": 0}
    c = {**common, "user_id": "u1", "event_time": T0, "amount": 200,  # earliest, arrived last
         "partition": 0, "offset": 6}
    listed = point_in_time_states([merchant, user], [a, b, c], "event_time")
    assert [x["merchant_all"]["count"] for x in listed] == [0, 1, 2]
    arrived = point_in_time_states([merchant, user], [a, b, c], "event_time",
                                   arrival=kafka_arrival(FRAUD_SPEC))
    # merchants by (event time, partition, offset): c, b, a
    assert [x["merchant_all"] for x in arrived] == [
        {"count": 2, "amount_sum": 300, "amount_sum_sq": 50_000},
        {"count": 1, "amount_sum": 200, "amount_sum_sq": 40_000},
        {"count": 0, "amount_sum": 0, "amount_sum_sq": 0},
    ]
    # users by offset: c (offset 6) comes after a (offset 5) although it is earlier in time
    assert [x["user_all"]["count"] for x in arrived] == [0, 0, 1]
    assert arrived[2]["user_all"]["amount_max"] == 300


def test_an_unknown_aggregation_kind_is_refused() -> None:
    @dataclass(frozen=True)
    class Distinct(Count):
        kind: ClassVar[str] = "distinct"

    with pytest.raises(SpecError, match="distinct"):
        view_states(FeatureView("odd", "user_id", {"d": Distinct()}), EVENTS, "event_time")


def test_fraud_model_inputs_by_hand() -> None:
    states = {
        "user_10m": {"count": 2, "amount_sum": 1500},
        "user_24h": {"count": 5, "amount_sum": 9000},
        # amounts 500, 1500, 500, 1500 cents: mean 1000, population std 500
        "user_all": {"count": 4, "amount_sum": 4000, "amount_sum_sq": 5_000_000, "amount_max": 1500},
        "merchant_all": {"count": 3, "amount_sum": 6000, "amount_sum_sq": 14_000_000},
    }
    event = {"amount": 3000, "merchant_category": "crypto", "channel": "online"}
    inputs = fraud_model_inputs(states, event)
    assert list(inputs) == list(FRAUD_SPEC.feature_names)
    assert inputs == {
        "log_amount": pytest.approx(math.log(31)),  # 30.00 in currency units
        "user_count_10m": 2.0,
        "user_log_amount_10m": pytest.approx(math.log(16)),
        "user_count_24h": 5.0,
        "user_log_count_all": pytest.approx(math.log(5)),
        "user_amount_zscore": 4.0,  # (3000 - 1000) / 500
        "user_log_ratio_to_max": pytest.approx(math.log(2)),
        "merchant_log_count_all": pytest.approx(math.log(4)),
        "merchant_log_mean_amount": pytest.approx(math.log(21)),  # mean 20.00
        "risky_category": 1.0,
        "online": 1.0,
    }


def test_fraud_model_inputs_of_a_first_event() -> None:
    empty = {view.name: empty_states(view) for view in FRAUD_SPEC.views}
    inputs = fraud_model_inputs(empty, {"amount": 999, "merchant_category": "fuel", "channel": "pos"})
    assert inputs.pop("log_amount") == pytest.approx(math.log(10.99))
    assert set(inputs.values()) == {0.0}
    one = dict(empty, user_all={"count": 1, "amount_sum": 500, "amount_sum_sq": 250_000, "amount_max": 500})
    assert fraud_model_inputs(one, {"amount": 500, "merchant_category": "fuel", "channel": "pos"})[
        "user_amount_zscore"] == 0.0  # fewer than two earlier events: no deviation yet
