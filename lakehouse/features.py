"""Point-in-time feature states: the one fold every layer uses.

`ViewStates` holds one feature view's monoid states per (entity, bucket) and answers, for an
event, the states of its window (`read`). `replay` walks events in arrival order and gives,
for each, the states of everything that preceded it, then adds it: that is the definition
of an event's features (see `FeatureView`). The batch layer replays each entity's history
inside Spark to build training sets; the speed layer keeps a `ViewStates` per view on top of
the published batch views and adds events as they arrive; `/predict` reads the same states.
A feature is therefore computed from one definition, whatever the layer.

Events here are typed records as `RecordSchema.parse` returns them: money in integer cents,
timestamps in epoch milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from lakehouse.spec import FeatureView, PlatformSpec

States = dict[str, dict[str, Any]]

# columns that say where a record arrived: its Kafka partition and offset
PARTITION, OFFSET = "partition", "offset"


class ViewStates:
    """Monoid states of one feature view per (entity, bucket start).

    Held per entity ({entity: {bucket: states}}), so a window read costs the buckets the
    entity has, not the window's width."""

    def __init__(self, view: FeatureView) -> None:
        self.view = view
        self._aggregations = tuple(view.aggregations.items())
        self._plus = tuple(a.plus for _, a in self._aggregations)
        self._names = tuple(name for name, _ in self._aggregations)
        self._zeros = tuple(a.zero for _, a in self._aggregations)
        self._window = (view.bucket_ms, view.window_buckets)
        self._states: dict[Any, dict[int, list[Any]]] = {}

    def __len__(self) -> int:
        return sum(len(buckets) for buckets in self._states.values())

    @property
    def names(self) -> tuple[str, ...]:
        """The view's aggregation names, in the order of its states."""
        return self._names

    @property
    def adders(self) -> tuple[Any, ...]:
        """Each aggregation's `plus`, in the order of its states."""
        return self._plus

    def holds(self, entity: Any) -> bool:
        """Whether any state of `entity` is held."""
        return bool(self._states.get(entity))

    def items(self) -> Iterator[tuple[tuple[Any, int], dict[str, Any]]]:
        """((entity, bucket start), states by aggregation name) of every state held."""
        names = self._names
        for entity, buckets in self._states.items():
            for bucket, values in buckets.items():
                yield (entity, bucket), dict(zip(names, values, strict=True))

    def held(self) -> Iterator[tuple[Any, int, list[Any]]]:
        """(entity, bucket start, states in the order of the view's aggregations) of every
        state held: the lists themselves, which a later `add` changes."""
        for entity, buckets in self._states.items():
            for bucket, values in buckets.items():
                yield entity, bucket, values

    def add(self, event: Mapping[str, Any], time_field: str) -> None:
        """Fold one event into its (entity, bucket) state."""
        entity = event[self.view.entity]
        bucket = self.view.bucket_of(event[time_field])
        buckets = self._states.get(entity)
        if buckets is None:
            buckets = self._states[entity] = {}
        state = buckets.get(bucket)
        if state is None:
            buckets[bucket] = [a.lift(event) for _, a in self._aggregations]
            return
        for i, (_, aggregation) in enumerate(self._aggregations):
            state[i] = aggregation.plus(state[i], aggregation.lift(event))

    def state_of(self, entity: Any, bucket: int) -> list[Any] | None:
        """The states of one (entity, bucket), in the order of the view's aggregations
        (None: nothing held); a copy."""
        state = self._states.get(entity, {}).get(bucket)
        return None if state is None else list(state)

    def merge_values(self, entity: Any, bucket: int, values: Sequence[Any]) -> None:
        """`merge` of states given in the order of the view's aggregations."""
        buckets = self._states.get(entity)
        if buckets is None:
            buckets = self._states[entity] = {}
        current = buckets.get(bucket)
        # a new list, never the held one changed: it may be shared (`merge_block`)
        buckets[bucket] = list(values) if current is None else [
            add(c, x) for add, c, x in zip(self._plus, current, values, strict=True)]

    def merge_block(self, entity: Any, buckets: Mapping[int, list[Any]]) -> None:
        """`merge_values` of several buckets of one entity; the lists given are held, not
        copied, and never changed (a merge into one of their buckets makes a new list)."""
        held = self._states.get(entity)
        if held is None:
            self._states[entity] = dict(buckets)
            return
        plus = self._plus
        for bucket, values in buckets.items():
            current = held.get(bucket)
            held[bucket] = values if current is None else [
                add(c, x) for add, c, x in zip(plus, current, values, strict=True)]

    def merge(self, entity: Any, bucket: int, state: Mapping[str, Any]) -> None:
        """Fold a precomputed state (a batch view row) into (entity, bucket)."""
        self.merge_values(entity, bucket, [state[name] for name in self._names])

    def window_of(self, event_time_ms: int) -> tuple[int, int]:
        """(first, last) bucket start of the window an event at `event_time_ms` sees."""
        bucket_ms, width = self._window
        if bucket_ms is None or width is None:
            return 0, 0
        last = event_time_ms - event_time_ms % bucket_ms
        return last - (width - 1) * bucket_ms, last

    def copy_between(self, entity: Any, first: int, last: int, into: ViewStates) -> None:
        """Merge this table's states of `entity` with bucket starts in [first, last] into
        `into` (a table of the same view)."""
        buckets = self._states.get(entity)
        if not buckets:
            return
        bucket_ms = self._window[0] or 1
        if (last - first) // bucket_ms + 1 < len(buckets):
            chosen = [(b, v) for b in range(first, last + 1, bucket_ms) if (v := buckets.get(b)) is not None]
        else:
            chosen = [(b, v) for b, v in buckets.items() if first <= b <= last]
        for bucket, values in chosen:
            into.merge_values(entity, bucket, values)

    def read_values(self, entity: Any, event_time_ms: int) -> list[Any]:
        """The states of an entity over the window an event at `event_time_ms` sees, in
        the order of the view's aggregations."""
        totals = list(self._zeros)
        buckets = self._states.get(entity)
        if not buckets:
            return totals
        bucket_ms, width = self._window
        if bucket_ms is None or width is None:
            chosen: Iterable[list[Any]] = buckets.values()
        else:
            last = event_time_ms - event_time_ms % bucket_ms
            first = last - (width - 1) * bucket_ms
            chosen = [v for b, v in buckets.items() if first <= b <= last] if len(buckets) < width \
                else [v for b in range(first, last + 1, bucket_ms) if (v := buckets.get(b)) is not None]
        plus = self._plus
        for state in chosen:
            for i, add in enumerate(plus):
                totals[i] = add(totals[i], state[i])
        return totals

    def read(self, entity: Any, event_time_ms: int) -> dict[str, Any]:
        """The states of an entity over the window an event at `event_time_ms` sees."""
        return dict(zip(self._names, self.read_values(entity, event_time_ms), strict=True))


def replay(views: Sequence[FeatureView], events: Iterable[Mapping[str, Any]],
           time_field: str) -> Iterator[States]:
    """For each event, in the order given, the states of `views` before it (it is added
    after it has been read)."""
    tables = [ViewStates(view) for view in views]
    for event in events:
        time_ms = event[time_field]
        yield {t.view.name: t.read(event[t.view.entity], time_ms) for t in tables}
        for table in tables:
            table.add(event, time_field)


def arrival_order(spec: PlatformSpec, view: FeatureView) -> tuple[str, ...]:
    """The columns that order one entity's events by arrival, as `FeatureView` defines it:
    Kafka (partition, offset) for the entity that keys the messages, (event time, partition,
    offset) for any other."""
    if view.entity == spec.events.key_field:
        return (PARTITION, OFFSET)
    return (spec.events.time_field, PARTITION, OFFSET)


def views_by_entity(spec: PlatformSpec) -> dict[str, list[FeatureView]]:
    """The spec's views grouped by the entity they aggregate over, in declaration order."""
    grouped: dict[str, list[FeatureView]] = {}
    for view in spec.views:
        grouped.setdefault(view.entity, []).append(view)
    return grouped


def state_column(view: str, aggregation: str) -> str:
    """Column name of one aggregation's point-in-time state in a flat table."""
    return f"{view}__{aggregation}"


def states_from_row(spec: PlatformSpec, row: Mapping[str, Any]) -> States:
    """Nested states from a flat row of `state_column` columns."""
    return {v.name: {a: row[state_column(v.name, a)] for a in v.aggregations} for v in spec.views}
