"""The speed layer's state: batch views ⊕ increments give each event exactly the states a
plain recomputation over the earlier events gives (the test oracle, not the shared fold),
across boundary handovers, released and restored partitions."""

from __future__ import annotations

import random
from typing import Any

from lakehouse.fraud import FRAUD_SPEC
from lakehouse.spec import FeatureView
from speed.state import GoldRow, SpeedState
from tests.oracle import point_in_time_states, states_by_view

T0 = 1_767_225_600_000


def stream(n: int, seed: int = 0) -> list[tuple[int, int, dict[str, Any]]]:
    """(partition, offset, event) in consumption order: users keyed to partitions."""
    rng = random.Random(seed)
    offsets = [0, 0, 0]
    out = []
    clock = T0
    for i in range(n):
        clock += rng.randint(1, 90_000)
        user = rng.randint(0, 20)
        partition = user % 3
        event = {"event_id": f"e{i}", "user_id": f"u{user}", "merchant_id": f"m{rng.randint(0, 5)}",
                 "merchant_category": "grocery", "channel": "online",
                 "amount": rng.randint(1, 50_000),
                 "event_time": clock - (rng.randint(0, 3_600_000) if rng.random() < 0.05 else 0)}
        out.append((partition, offsets[partition], event))
        offsets[partition] += 1
    return out


def gold_of(events: list[dict[str, Any]], views: tuple[FeatureView, ...]) -> list[GoldRow]:
    """Batch view rows (view, entity, bucket, state) of some events, as the batch layer writes
    them, computed by the oracle."""
    tables = states_by_view(views, events, "event_time")
    return [(name, entity, bucket, state)
            for name, table in tables.items() for (entity, bucket), state in table.items()]


def user_views() -> tuple[FeatureView, ...]:
    return tuple(v for v in FRAUD_SPEC.views if v.entity == "user_id")


def expected_user_states(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each event's user-view states over the events consumed before it (the key entity's
    arrival order is consumption order), by the oracle."""
    return point_in_time_states(user_views(), events, "event_time")


def speed_user_states(state: SpeedState, event: dict[str, Any]) -> dict[str, Any]:
    states = state.states(event)
    return {v.name: states[v.name] for v in user_views()}


def test_without_a_base_speed_states_are_the_recomputation() -> None:
    items = stream(400)
    state = SpeedState(FRAUD_SPEC)
    expected = point_in_time_states(FRAUD_SPEC.views, [e for _, _, e in items], "event_time")
    for (partition, offset, event), want in zip(items, expected, strict=True):
        assert state.states(event) == want
        state.add(event, partition, offset)


def test_a_handover_mid_stream_changes_no_feature() -> None:
    items = stream(600, seed=1)
    expected = expected_user_states([e for _, _, e in items])
    state = SpeedState(FRAUD_SPEC)
    handover_at = 350
    boundary: dict[int, int] = {}
    for partition, offset, _ in items[:300]:  # the batch run covers the first 300 arrivals
        boundary[partition] = max(boundary.get(partition, -1), offset)
    batch_events = [e for _, _, e in items[:300]]
    for i, (partition, offset, event) in enumerate(items):
        if i == handover_at:
            assert state.can_adopt(boundary, owned=[0, 1, 2])
            dropped = state.adopt("run-2", boundary, gold_of(batch_events, FRAUD_SPEC.views))
            assert dropped == 300
        assert speed_user_states(state, event) == expected[i], i
        state.add(event, partition, offset)
    assert sum(len(k) for k in state.kept.values()) == 300


def test_a_run_ahead_of_the_consumer_is_not_adopted() -> None:
    items = stream(50, seed=2)
    state = SpeedState(FRAUD_SPEC)
    for partition, offset, event in items[:10]:
        state.add(event, partition, offset)
    assert not state.can_adopt({0: 1000}, owned=[0, 1, 2])
    assert state.can_adopt({p: -1 for p in range(3)}, owned=[0, 1, 2])


def test_events_inside_the_base_are_not_added_twice() -> None:
    items = stream(100, seed=3)
    events = [e for _, _, e in items]
    boundary: dict[int, int] = {}
    for partition, offset, _ in items[:60]:
        boundary[partition] = max(boundary.get(partition, -1), offset)
    state = SpeedState(FRAUD_SPEC)
    state.adopt("run-1", boundary, gold_of(events[:60], FRAUD_SPEC.views))
    expected = expected_user_states(events)
    for i, (partition, offset, event) in enumerate(items):
        if i >= 60:
            assert speed_user_states(state, event) == expected[i]
        state.add(event, partition, offset)  # the first 60 are in the base: ignored
    assert sum(len(k) for k in state.kept.values()) == 40


def test_released_and_restored_partitions() -> None:
    items = stream(300, seed=4)
    events = [e for _, _, e in items]
    expected = expected_user_states(events)
    state = SpeedState(FRAUD_SPEC)
    for partition, offset, event in items[:200]:
        state.add(event, partition, offset)
    state.release([1])  # a rebalance took partition 1 away...
    assert 1 not in state.kept and 1 not in state.positions
    taken = [(o, e) for p, o, e in items[:200] if p == 1]
    state.restore(1, taken, next_offset=taken[-1][0] + 1)  # ...and gave it back
    for i in range(200, 300):
        partition, offset, event = items[i]
        assert speed_user_states(state, event) == expected[i]
        state.add(event, partition, offset)
