"""The point-in-time fold every layer shares: what an event sees, by hand-made cases."""

from __future__ import annotations

from lakehouse.features import ViewStates, arrival_order, replay
from lakehouse.fraud import FRAUD_SPEC, MERCHANT_ALL, USER_10M, USER_ALL

MINUTE = 60_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a bucket start for every view


def tx(n: int, minute: float, amount: int, user: str = "u1", merchant: str = "m1") -> dict:  # type: ignore[type-arg]
    return {"event_id": f"e{n}", "user_id": user, "merchant_id": merchant,
            "amount": amount, "event_time": T0 + int(minute * MINUTE)}


def test_an_event_sees_what_preceded_it_not_itself() -> None:
    events = [tx(1, 0, 100), tx(2, 1, 300), tx(3, 2, 200)]
    seen = list(replay([USER_ALL], events, "event_time"))
    assert seen[0]["user_all"] == {"count": 0, "amount_sum": 0, "amount_sum_sq": 0, "amount_max": None}
    assert seen[1]["user_all"] == {"count": 1, "amount_sum": 100, "amount_sum_sq": 10_000, "amount_max": 100}
    assert seen[2]["user_all"] == {"count": 2, "amount_sum": 400, "amount_sum_sq": 100_000, "amount_max": 300}


def test_windows_count_buckets_ending_at_the_events_own() -> None:
    # user_10m: ten one-minute buckets, the event's own included
    events = [tx(1, 0.5, 100), tx(2, 9.9, 100), tx(3, 10.0, 100), tx(4, 19.99, 100)]
    seen = [s["user_10m"]["count"] for s in replay([USER_10M], events, "event_time")]
    # e3 at minute 10: window is buckets 1..10, so e1 (bucket 0) fell out, e2 counts
    # e4 at minute 19.99: window 10..19: e3 counts, e2 (bucket 9) does not
    assert seen == [0, 1, 1, 1]


def test_a_late_event_sees_what_arrived_before_it_and_is_seen_by_what_follows() -> None:
    on_time = tx(1, 5, 100)
    late = tx(2, 1, 500)  # made at minute 1, arrives after e1
    after = tx(3, 6, 100)
    seen = list(replay([USER_10M, USER_ALL], [on_time, late, after], "event_time"))
    assert seen[1]["user_all"]["count"] == 1
    assert seen[1]["user_10m"]["count"] == 0  # e1's bucket lies after the late event's window
    assert seen[2]["user_all"] == {"count": 2, "amount_sum": 600, "amount_sum_sq": 260_000, "amount_max": 500}
    assert seen[2]["user_10m"]["amount_sum"] == 600


def test_entities_do_not_mix() -> None:
    events = [tx(1, 0, 100, user="a"), tx(2, 1, 100, user="b"), tx(3, 2, 100, user="a")]
    seen = [s["user_all"]["count"] for s in replay([USER_ALL], events, "event_time")]
    assert seen == [0, 0, 1]


def test_merged_batch_states_read_like_replayed_events() -> None:
    """A batch view row merged in (what the speed layer starts from) is the same as having
    added its events one by one."""
    events = [tx(i, i * 0.7, 100 + i) for i in range(12)]
    added, merged = ViewStates(USER_10M), ViewStates(USER_10M)
    per_bucket: dict[int, dict[str, int]] = {}
    for event in events:
        added.add(event, "event_time")
        bucket = USER_10M.bucket_of(event["event_time"])
        state = per_bucket.setdefault(bucket, {"count": 0, "amount_sum": 0})
        state["count"] += 1
        state["amount_sum"] += event["amount"]
    for bucket, state in per_bucket.items():
        merged.merge("u1", bucket, state)
    probe = T0 + 9 * MINUTE
    assert added.read("u1", probe) == merged.read("u1", probe) != {"count": 0, "amount_sum": 0}


def test_arrival_order_is_offsets_for_the_key_entity_and_event_time_otherwise() -> None:
    assert arrival_order(FRAUD_SPEC, USER_ALL) == ("partition", "offset")
    assert arrival_order(FRAUD_SPEC, MERCHANT_ALL) == ("event_time", "partition", "offset")
