"""The speed layer's feature state: a published batch run's views ⊕ the online store's
increments after the run's cut ⊕ the micro-batch's own earlier events.

Every valid event's model inputs are computed as of a *coverage vector*: per Kafka
partition, the highest offset whose events they include. For a micro-batch, the store is
read once (`OnlineStore.read`, every partition, the epochs after the adopted run's cut):
that read's coverage is the vector for every partition but the event's own, where the
event sees its partition's strictly earlier offsets: the store's (every offset through the
read's coverage) and the micro-batch's own events before it (`MicroBatch`). The batch
layer's training set recomputes each scored event's features as of exactly that vector.

The run's gold views hold every event at or below its cut and the epochs after the cut
every event above it, so base ⊕ store is exact whatever the relative speed of the layers:
a newer run is installed as soon as its gold is loaded (`prepare` in a background thread,
`install` between two micro-batches).

Pure logic: loading gold rows and talking to the store live in `speed.consumer`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lakehouse.features import ViewStates
from lakehouse.online.base import BlockStates, StateKey, blocks_between
from lakehouse.spec import PlatformSpec

# (view name, entity, bucket start, {aggregation: state}) rows of the batch views
GoldRow = tuple[str, Any, int, Mapping[str, Any]]
# (view name, entity) → (first, last) bucket start its events' windows read
Windows = dict[tuple[str, Any], tuple[int, int]]


@dataclass
class Base:
    """The batch run the state is built on (None: no run adopted, an empty base)."""

    run_id: str | None = None
    boundary: dict[int, int] = field(default_factory=dict)
    cut_epochs: dict[int, int] = field(default_factory=dict)  # the store epochs the run closed


@dataclass
class PreparedBase:
    base: Base
    tables: dict[str, ViewStates]


class SpeedState:
    def __init__(self, spec: PlatformSpec) -> None:
        self.spec = spec
        self.time_field = spec.events.time_field
        self._views = {view.name: view for view in spec.views}
        self.base = Base()
        self.base_tables = self._empty()  # the adopted run's views, never added to

    def _empty(self) -> dict[str, ViewStates]:
        return {view.name: ViewStates(view) for view in self.spec.views}

    def windows(self, events: Iterable[Mapping[str, Any]]) -> Windows:
        """What events' features read: per (view, entity), the first and last bucket start
        of their windows."""
        out: Windows = {}
        tables = list(self.base_tables.values())
        for event in events:
            time_ms = event[self.time_field]
            for table in tables:
                key = (table.view.name, event[table.view.entity])
                first, last = table.window_of(time_ms)
                known = out.get(key)
                if known is None:
                    out[key] = (first, last)
                elif first < known[0] or last > known[1]:
                    out[key] = (min(first, known[0]), max(last, known[1]))
        return out

    def keys(self, windows: Windows) -> list[StateKey]:
        """The store keys of `windows`: one per block (`block_of`) the windows reach into (the
        store returns every bucket of a block)."""
        views = self._views
        return [(view, entity, block) for (view, entity), (first, last) in windows.items()
                for block in blocks_between(views[view], first, last)]

    def micro_batch(self, stored: BlockStates, windows: Windows) -> MicroBatch:
        """The view of one micro-batch: the base ⊕ the states `stored` (one store read's
        blocks), for the `windows` its events read."""
        return MicroBatch(self, stored, windows)

    # ------------------------------------------------------------------ handover
    def prepare(self, run_id: str, boundary: Mapping[int, int], cut_epochs: Mapping[int, int],
                gold: Iterable[GoldRow]) -> PreparedBase:
        """Build a run's view states (slow for big views; safe in a background thread)."""
        tables = self._empty()
        for view_name, entity, bucket, state in gold:
            tables[view_name].merge(entity, bucket, state)
        return PreparedBase(Base(run_id, dict(boundary), dict(cut_epochs)), tables)

    def install(self, prepared: PreparedBase) -> None:
        """Switch to a prepared base: the next micro-batch reads the epochs after its cut."""
        self.base, self.base_tables = prepared.base, prepared.tables


class MicroBatch:
    """Features of one micro-batch's events: base ⊕ one store read, summed once per key the
    batch reads, ⊕, per partition, the batch's own events added so far (`add`, in offset
    order), which are also that partition's step increments (`increments`)."""

    def __init__(self, state: SpeedState, stored: BlockStates, windows: Windows) -> None:
        self.state = state
        self.before = state._empty()  # base ⊕ stored, for the windows asked
        for (view, entity), (first, last) in windows.items():
            state.base_tables[view].copy_between(entity, first, last, self.before[view])
        for (view, entity, _), buckets in stored.items():
            self.before[view].merge_block(entity, buckets)
        self.local: dict[int, dict[str, ViewStates]] = {}

    def states(self, event: Mapping[str, Any], partition: int) -> dict[str, dict[str, Any]]:
        """Each view's states for an event of `partition`, from everything before it."""
        out = {}
        time_ms = event[self.state.time_field]
        local = self.local.get(partition)
        for name, before in self.before.items():
            entity = event[before.view.entity]
            values = before.read_values(entity, time_ms)
            if local is not None and local[name].holds(entity):
                added = local[name].read_values(entity, time_ms)
                values = [plus(v, a) for plus, v, a in zip(before.adders, values, added, strict=True)]
            out[name] = dict(zip(before.names, values, strict=True))
        return out

    def features(self, event: Mapping[str, Any], partition: int) -> list[float]:
        return self.state.spec.features(self.states(event, partition), event)

    def add(self, event: Mapping[str, Any], partition: int) -> None:
        """Fold an event in: later events of its partition see it."""
        local = self.local.get(partition)
        if local is None:
            local = self.local[partition] = self.state._empty()
        for table in local.values():
            table.add(event, self.state.time_field)

    def increments(self, partition: int) -> dict[StateKey, list[Any]]:
        """The monoid states of the events added for `partition`: its step's increments."""
        return {(name, entity, bucket): values  # held: no event is added after a step
                for name, table in self.local.get(partition, {}).items()
                for entity, bucket, values in table.held()}
