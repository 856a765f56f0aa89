"""The speed layer's state: a run's gold ⊕ one store read ⊕ the micro-batch's own earlier
events give each event exactly the states of its coverage vector (every other partition
through the read's coverage, its own partition before it), by a plain recomputation (the
test oracle, not the shared fold), for every view, merchants included."""

from __future__ import annotations

import random
from typing import Any

from lakehouse.fraud import FRAUD_SPEC
from lakehouse.online.base import BlockStates, StateKey, block_of, by_block
from speed.state import GoldRow, SpeedState
from tests.oracle import states_by_view, window_states

T0 = 1_767_225_600_000
VIEWS = FRAUD_SPEC.views


def stream(n: int, seed: int) -> dict[int, list[dict[str, Any]]]:
    """Events per partition in offset order (users keyed to partitions; merchants anywhere)."""
    rng = random.Random(seed)
    out: dict[int, list[dict[str, Any]]] = {0: [], 1: [], 2: []}
    clock = T0
    for i in range(n):
        clock += rng.randint(1, 90_000)
        user = rng.randint(0, 20)
        out[user % 3].append({
            "event_id": f"e{i}", "user_id": f"u{user}", "merchant_id": f"m{rng.randint(0, 5)}",
            "merchant_category": "grocery", "channel": "online", "amount": rng.randint(1, 50_000),
            "event_time": clock - (rng.randint(0, 3_600_000) if rng.random() < 0.05 else 0)})
    return out


def gold_of(events: list[dict[str, Any]]) -> list[GoldRow]:
    tables = states_by_view(VIEWS, events, "event_time")
    return [(name, entity, bucket, state)
            for name, table in tables.items() for (entity, bucket), state in table.items()]


def states_of(events: list[dict[str, Any]]) -> dict[StateKey, list[Any]]:
    """Some events' states per (view, entity, bucket)."""
    tables = states_by_view(VIEWS, events, "event_time")
    return {(view.name, entity, bucket): [states[a] for a in view.aggregations]
            for view in VIEWS for (entity, bucket), states in tables[view.name].items()}


def stored_of(events: list[dict[str, Any]]) -> BlockStates:
    """What a store read returns for some events: their states per block."""
    return by_block({view.name: view for view in VIEWS}, states_of(events))


def expected(included: list[dict[str, Any]], event: dict[str, Any]) -> dict[str, dict[str, Any]]:
    tables = states_by_view(VIEWS, included, "event_time")
    return {view.name: window_states(view, tables[view.name], event[view.entity], event["event_time"])
            for view in VIEWS}


def test_each_event_sees_exactly_its_coverage_vector() -> None:
    parts = stream(600, seed=1)
    rng = random.Random(2)
    cut = {p: rng.randrange(len(events) // 3) for p, events in parts.items()}
    covered = {p: rng.randrange(cut[p], 2 * len(events) // 3) for p, events in parts.items()}
    state = SpeedState(FRAUD_SPEC)
    gold = [e for p, events in parts.items() for e in events[:cut[p] + 1]]
    state.install(state.prepare("run-1", cut, {0: 1, 1: 1, 2: 1}, gold_of(gold)))
    stored = stored_of([e for p, events in parts.items() for e in events[cut[p] + 1:covered[p] + 1]])
    in_batch = {p: range(covered[p] + 1, min(len(events), covered[p] + 40)) for p, events in parts.items()}
    windows = state.windows([parts[p][o] for p, offsets in in_batch.items() for o in offsets])
    batch = state.micro_batch(stored, windows)
    checked = 0
    for p, events in parts.items():
        for offset in in_batch[p]:
            event = events[offset]
            vector = {**covered, p: offset - 1}
            included = [e for q, es in parts.items() for e in es[:vector[q] + 1]]
            assert batch.states(event, p) == expected(included, event), (p, offset)
            batch.add(event, p)
            checked += 1
    assert checked > 60
    for p, offsets in in_batch.items():  # a partition's own fold is its step's increments
        assert batch.increments(p) == states_of([parts[p][o] for o in offsets])


def test_without_a_run_the_store_alone_is_the_history() -> None:
    parts = stream(200, seed=3)
    state = SpeedState(FRAUD_SPEC)
    history = [e for events in parts.values() for e in events[:50]]
    event = parts[1][50]
    batch = state.micro_batch(stored_of(history), state.windows([event]))
    assert batch.states(event, 1) == expected(history, event)
    assert batch.features(event, 1) == FRAUD_SPEC.features(expected(history, event), event)


def test_the_windows_of_events_span_their_window_buckets_in_every_view() -> None:
    events = [e for es in stream(40, seed=4).values() for e in es]
    state = SpeedState(FRAUD_SPEC)
    windows = state.windows(events)
    for view in VIEWS:
        for entity in {e[view.entity] for e in events}:
            buckets = [b for e in events if e[view.entity] == entity for b in view.window_buckets_of(e["event_time"])]
            assert windows[(view.name, entity)] == (min(buckets), max(buckets))
    # one store key per block the windows reach into, each block once
    keys = state.keys(windows)
    assert len(keys) == len(set(keys))
    for (name, entity), (first, last) in windows.items():
        view = FRAUD_SPEC.view(name)
        assert {b for v, e, b in keys if (v, e) == (name, entity)} == \
            {block_of(view, b) for b in range(first, last + 1, view.bucket_ms or 1)}
