"""The training set's recomputation as of coverage vectors (`batch.training_set.as_of_vectors`)
equals a plain recomputation (the test oracle) of exactly the events each vector includes:
the entity's events of every other partition at or below the vector's offset, and of the
event's own partition before it."""

from __future__ import annotations

import random
from typing import Any

import pytest

from batch.training_set import COVERAGE, as_of_vectors
from lakehouse.features import OFFSET, PARTITION
from lakehouse.fraud import FRAUD_SPEC
from tests.oracle import states_by_view, window_states

T0 = 1_767_225_600_000
MERCHANT_VIEWS = [v for v in FRAUD_SPEC.views if v.entity == "merchant_id"]
USER_VIEWS = [v for v in FRAUD_SPEC.views if v.entity == "user_id"]  # windowed, in buckets


def merchant_events(n: int, seed: int) -> list[dict[str, Any]]:
    """One merchant's events over three partitions, each with a coverage vector that a
    micro-batch read could have given it (or none: never scored)."""
    rng = random.Random(seed)
    offsets = [0, 0, 0]
    out = []
    for i in range(n):
        p = rng.randrange(3)
        event = {"event_id": f"e{i}", "user_id": "u1", "merchant_id": "m1",
                 "merchant_category": "grocery", "channel": "online", "amount": rng.randint(1, 90_000),
                 "event_time": T0 + rng.randrange(3 * 3_600_000), PARTITION: p, OFFSET: offsets[p] * 3 + 1}
        offsets[p] += 1
        out.append(event)
    for event in out:
        if rng.random() < 0.8:
            event[COVERAGE] = [(q, rng.randrange(-1, 3 * n)) for q in range(3) if q != event[PARTITION]]
        else:
            event[COVERAGE] = None
    return out


def included(events: list[dict[str, Any]], event: dict[str, Any]) -> list[dict[str, Any]]:
    vector = dict(event[COVERAGE])
    return [e for e in events if (e[OFFSET] < event[OFFSET] if e[PARTITION] == event[PARTITION]
                                  else e[OFFSET] <= vector.get(e[PARTITION], -1))]


@pytest.mark.parametrize(("views", "entity"), [(MERCHANT_VIEWS, "m1"), (USER_VIEWS, "u1")])
def test_each_scored_event_sees_exactly_its_vector(views: list[Any], entity: str) -> None:
    events = merchant_events(300, seed=3)
    got = as_of_vectors(views, events, "event_time")
    scored = [i for i, e in enumerate(events) if e[COVERAGE] is not None]
    assert set(got) == set(scored) and len(scored) > 200
    for i in scored:
        event = events[i]
        tables = states_by_view(views, included(events, event), "event_time")
        expected = {v.name: window_states(v, tables[v.name], entity, event["event_time"]) for v in views}
        assert got[i] == expected, i
