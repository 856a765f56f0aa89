"""The speed layer's feature state: a published batch run's views ⊕ the events consumed
after its boundary.

`SpeedState` answers, for each valid event in arrival order, the model input vector as of
just before it (the fold of `lakehouse.features`, the one the batch layer replays), then
adds the event. It keeps the events it added since the adopted run's boundary, per Kafka
partition, so that adopting a newer run (the boundary handover) is exact: the new run's
views already hold every event at or below its boundary, and only the kept events above it
are added back. A run is adopted only once this process has consumed past its boundary in
every partition it owns; until then the older base stays, so nothing is counted twice or
missed whatever the relative speed of the two layers.

Pure logic: loading gold rows and reading Kafka live in `speed.consumer`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lakehouse.features import ViewStates
from lakehouse.spec import PlatformSpec

# (view name, entity, bucket start, {aggregation: state}) rows of the batch views
GoldRow = tuple[str, Any, int, Mapping[str, Any]]


@dataclass
class Base:
    """The batch run the state is built on (None: no run adopted, an empty base)."""

    run_id: str | None = None
    boundary: dict[int, int] = field(default_factory=dict)

    def includes(self, partition: int, offset: int) -> bool:
        return offset <= self.boundary.get(partition, -1)


@dataclass
class PreparedBase:
    base: Base
    tables: dict[str, ViewStates]


class SpeedState:
    def __init__(self, spec: PlatformSpec) -> None:
        self.spec = spec
        self.time_field = spec.events.time_field
        self.base = Base()
        self.base_tables = self._empty()  # the adopted run's views, never added to
        self.increments = self._empty()  # the kept events
        self.kept: dict[int, list[tuple[int, dict[str, Any]]]] = {}  # partition → (offset, event)
        self.positions: dict[int, int] = {}  # partition → next offset to consume

    def _empty(self) -> dict[str, ViewStates]:
        return {view.name: ViewStates(view) for view in self.spec.views}

    # ------------------------------------------------------------------ scoring path
    def states(self, event: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Each view's states for an event: batch view ⊕ increments."""
        out = {}
        time_ms = event[self.time_field]
        for name, base in self.base_tables.items():
            entity = event[base.view.entity]
            batch, speed = base.read(entity, time_ms), self.increments[name].read(entity, time_ms)
            out[name] = {agg: aggregation.plus(batch[agg], speed[agg])
                         for agg, aggregation in base.view.aggregations.items()}
        return out

    def features(self, event: Mapping[str, Any]) -> list[float]:
        """The model inputs of an event from everything added before it."""
        return self.spec.features(self.states(event), event)

    def add(self, event: dict[str, Any], partition: int, offset: int) -> None:
        """Fold a consumed valid event in (unless the base run already holds it)."""
        self.positions[partition] = offset + 1
        if self.base.includes(partition, offset):
            return
        for table in self.increments.values():
            table.add(event, self.time_field)
        self.kept.setdefault(partition, []).append((offset, event))

    def skip(self, partition: int, offset: int) -> None:
        """A consumed record that is not a state event (invalid, duplicate)."""
        self.positions[partition] = offset + 1

    # ------------------------------------------------------------------ handover
    def can_adopt(self, boundary: Mapping[int, int], owned: Iterable[int]) -> bool:
        """True when this process has consumed past `boundary` in every partition it owns."""
        return all(self.positions.get(p, 0) > boundary.get(p, -1) for p in owned)

    def prepare(self, run_id: str, boundary: Mapping[int, int], gold: Iterable[GoldRow]) -> PreparedBase:
        """Build a run's view states (slow for big views; safe in a background thread)."""
        tables = self._empty()
        for view_name, entity, bucket, state in gold:
            tables[view_name].merge(entity, bucket, state)
        return PreparedBase(Base(run_id, dict(boundary)), tables)

    def install(self, prepared: PreparedBase) -> int:
        """Switch to a prepared base: keep the events above its boundary, drop the rest
        (now inside the batch views). Returns how many were dropped."""
        base = prepared.base
        before = sum(len(events) for events in self.kept.values())
        self.kept = {p: [(o, e) for o, e in events if not base.includes(p, o)]
                     for p, events in self.kept.items()}
        self.base, self.base_tables = base, prepared.tables
        self._rebuild_increments()
        return before - sum(len(events) for events in self.kept.values())

    def adopt(self, run_id: str, boundary: Mapping[int, int], gold: Iterable[GoldRow]) -> int:
        """Rebuild on a newer batch run: its views, plus the kept events above its boundary.
        Returns how many kept events were dropped (now inside the batch views)."""
        return self.install(self.prepare(run_id, boundary, gold))

    def release(self, partitions: Iterable[int]) -> None:
        """Forget partitions this process no longer owns: their events leave the state."""
        for p in partitions:
            self.kept.pop(p, None)
            self.positions.pop(p, None)
        self._rebuild_increments()

    def restore(self, partition: int, events: Iterable[tuple[int, dict[str, Any]]],
                next_offset: int) -> None:
        """Take over a partition: add its already-scored events (in offset order) and
        resume at `next_offset`."""
        for offset, event in events:
            self.add(event, partition, offset)
        self.positions[partition] = next_offset

    def _rebuild_increments(self) -> None:
        self.increments = self._empty()
        for events in self.kept.values():
            for _, event in events:
                for table in self.increments.values():
                    table.add(event, self.time_field)
