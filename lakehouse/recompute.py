"""Feature-view states recomputed in plain Python: the reference the shared fold is checked against.

Every layer folds events with the monoids (`Aggregation.lift`/`plus`/`zero`, through
`lakehouse.features.ViewStates` and `replay`). A check that folds with them too repeats any
bug it should catch. This module recomputes the same states from what a view declares, its
entity, its buckets and each aggregation's `kind` and `field`, with dicts and integer
arithmetic; it never calls the monoids, `ViewStates`, `replay` or `FeatureView.bucket_of` /
`window_buckets_of`. The exact-merge check (`lambdalake verify`) and every "equals a
recomputation" test compare what the platform computed with this. It favours being obviously
right over being fast: it is not on any data path.

Data contracts: events are typed records as `RecordSchema.parse` returns them (money in
integer cents, times in integer epoch milliseconds, UTC). A bucket start is the epoch ms at
which an event's bucket begins, 0 for views without buckets. States of no events are 0 for
count, sum and sum_sq, None for max and min. An event's window holds the events x of its
entity with bucket(e) - window_buckets < bucket(x) <= bucket(e), counted in buckets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from lakehouse.errors import SpecError
from lakehouse.spec import FeatureView, PlatformSpec

__all__ = [
    "ArrivalKey",
    "States",
    "Table",
    "bucket_start",
    "empty_states",
    "kafka_arrival",
    "point_in_time_states",
    "states_by_view",
    "view_states",
    "window_states",
]

States = dict[str, Any]
"""One aggregation name → its state."""
Table = dict[tuple[Any, int], States]
"""(entity, bucket start ms) → the states of that entity's events in that bucket."""
ArrivalKey = Callable[[FeatureView, Mapping[str, Any]], Any]
"""Sort key that orders one view's events by arrival."""

_SUMMED = ("count", "sum", "sum_sq")
_EXTREMES = ("max", "min")


def _kind(view: FeatureView, name: str) -> str:
    kind = view.aggregations[name].kind
    if kind not in _SUMMED + _EXTREMES:
        raise SpecError(f"feature view {view.name}: aggregation {name!r} is of kind {kind!r}, "
                        f"which lakehouse.recompute cannot recompute; teach it the kind first")
    return kind


def _event_value(view: FeatureView, name: str, event: Mapping[str, Any]) -> int:
    """What one event contributes to one aggregation."""
    kind = _kind(view, name)
    if kind == "count":
        return 1
    value = int(event[str(view.aggregations[name].field)])
    return value * value if kind == "sum_sq" else value


def _combined(kind: str, left: Any, right: Any) -> Any:
    if kind in _SUMMED:
        return left + right
    if left is None:
        return right
    if right is None:
        return left
    return max(left, right) if kind == "max" else min(left, right)


def empty_states(view: FeatureView) -> States:
    """The states of no events."""
    return {name: None if _kind(view, name) in _EXTREMES else 0 for name in view.aggregations}


def bucket_start(view: FeatureView, time_ms: int) -> int:
    """Epoch ms at which the bucket of an event at `time_ms` starts; 0 without buckets."""
    if view.bucket_ms is None:
        return 0
    return time_ms // view.bucket_ms * view.bucket_ms


def _in_window(view: FeatureView, start_ms: int, time_ms: int) -> bool:
    """Whether a bucket starting at `start_ms` is in the window of an event at `time_ms`."""
    if view.bucket_ms is None or view.window_buckets is None:
        return True
    mine, theirs = time_ms // view.bucket_ms, start_ms // view.bucket_ms
    return mine - view.window_buckets < theirs <= mine


def _add_event(view: FeatureView, states: States, event: Mapping[str, Any]) -> None:
    for name in view.aggregations:
        states[name] = _combined(_kind(view, name), states[name], _event_value(view, name, event))


def _sum_window(view: FeatureView, buckets: Mapping[int, States], time_ms: int) -> States:
    """Sum of one entity's bucket states over the window of an event at `time_ms`."""
    total = empty_states(view)
    for start_ms, states in buckets.items():
        if _in_window(view, start_ms, time_ms):
            for name in view.aggregations:
                total[name] = _combined(_kind(view, name), total[name], states[name])
    return total


def states_by_view(views: Sequence[FeatureView], events: Iterable[Mapping[str, Any]],
                   time_field: str) -> dict[str, Table]:
    """Each view's states per (entity, bucket start) over `events` (one pass, any order)."""
    tables: dict[str, Table] = {view.name: {} for view in views}
    for event in events:
        for view in views:
            key = (event[view.entity], bucket_start(view, event[time_field]))
            states = tables[view.name].get(key)
            if states is None:
                states = tables[view.name][key] = empty_states(view)
            _add_event(view, states, event)
    return tables


def view_states(view: FeatureView, events: Iterable[Mapping[str, Any]], time_field: str) -> Table:
    """One view's states per (entity, bucket start) over `events`."""
    return states_by_view([view], events, time_field)[view.name]


def window_states(view: FeatureView, table: Table, entity: Any, time_ms: int) -> States:
    """The states an event of `entity` at `time_ms` sees in `table`: its window's buckets."""
    buckets = {start: states for (owner, start), states in table.items() if owner == entity}
    return _sum_window(view, buckets, time_ms)


def point_in_time_states(views: Sequence[FeatureView], events: Sequence[Mapping[str, Any]],
                         time_field: str, *, arrival: ArrivalKey | None = None) -> list[dict[str, States]]:
    """For each event (in the order given), each view's states over the events of its entity
    that arrived before it, within its window: the states its features derive from.

    Arrival is the order of `events` unless `arrival` gives a sort key per view (see
    `kafka_arrival`); the result is in the order of `events` either way."""
    out: list[dict[str, States]] = [{} for _ in events]
    for view in views:
        order: Iterable[int] = range(len(events))
        if arrival is not None:
            order = sorted(order, key=lambda i: arrival(view, events[i]))
        history: dict[Any, dict[int, States]] = {}  # entity → bucket start → states so far
        for i in order:
            event = events[i]
            buckets = history.setdefault(event[view.entity], {})
            out[i][view.name] = _sum_window(view, buckets, event[time_field])
            start = bucket_start(view, event[time_field])
            if start not in buckets:
                buckets[start] = empty_states(view)
            _add_event(view, buckets[start], event)
    return out


def kafka_arrival(spec: PlatformSpec) -> ArrivalKey:
    """Arrival order as `FeatureView` defines it, for events that carry their Kafka
    `partition` and `offset`: offsets within the partition for the entity that keys the
    messages; (event time, partition, offset) for any other entity."""
    time_field, key_field = spec.events.time_field, spec.events.key_field

    def key(view: FeatureView, event: Mapping[str, Any]) -> tuple[int, ...]:
        if view.entity == key_field:
            return (event["partition"], event["offset"])
        return (event[time_field], event["partition"], event["offset"])

    return key
