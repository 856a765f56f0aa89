"""Point lookups for /predict: one entity's states in microseconds, without a SQL statement.

A `PointIndex` is built at each refresh from the same Arrow data the DuckDB snapshot is
loaded from: each gold view sorted by entity (a binary search finds an entity's rows), and
the speed increments grouped by entity. The increments are shared between successive
indexes of one batch run and only grow; an index reads those at or below its own
`coverage`, so an index is an immutable snapshot and a request reads exactly one (the
reference is swapped atomically). A new batch run starts a new increments map holding only
events above its boundary.

Lookups fold exactly as the speed layer does (`ViewStates.merge` for gold rows,
`ViewStates.add` for later events): one definition of a feature.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lakehouse.features import OFFSET, PARTITION, ViewStates
from lakehouse.spec import FeatureView, PlatformSpec
from lakehouse.tables import BUCKET, EVENT_TIME_MS

# entity field → entity → [(partition, offset, typed event), ...] in arrival order
Increments = dict[str, dict[Any, list[tuple[int, int, dict[str, Any]]]]]


class GoldIndex:
    """One gold view sorted by (entity, bucket)."""

    def __init__(self, view: FeatureView, table: pa.Table) -> None:
        self.view = view
        order = pc.sort_indices(table, sort_keys=[(view.entity, "ascending"), (BUCKET, "ascending")])
        table = table.take(order)
        entities = table.column(view.entity).to_pylist()
        self.keys = np.array(entities, dtype=object)
        self.buckets = table.column(BUCKET).to_numpy(zero_copy_only=False)
        self.columns = [table.column(n).to_pylist() for n in view.aggregations]

    def rows(self, entity: Any) -> range:
        return range(int(np.searchsorted(self.keys, entity, "left")),
                     int(np.searchsorted(self.keys, entity, "right")))


@dataclass(frozen=True)
class PointIndex:
    spec: PlatformSpec
    run_id: str | None
    boundary: dict[int, int]
    coverage: dict[int, int]
    gold: dict[str, GoldIndex]
    increments: Increments

    @classmethod
    def empty(cls, spec: PlatformSpec) -> PointIndex:
        return cls(spec, None, {}, {}, {}, {v.entity: {} for v in spec.views})

    def with_run(self, run_id: str, boundary: dict[int, int], gold: Mapping[str, pa.Table]) -> PointIndex:
        """A new batch run: its gold views, and the increments above its boundary."""
        increments: Increments = {}
        for field, by_entity in self.increments.items():
            kept = {}
            for entity, arrived in by_entity.items():
                later = [a for a in arrived if a[1] > boundary.get(a[0], -1)]
                if later:
                    kept[entity] = later
            increments[field] = kept
        views = {v.name: GoldIndex(v, gold[v.name]) for v in self.spec.views}
        return PointIndex(self.spec, run_id, dict(boundary), dict(self.coverage), views, increments)

    def with_events(self, events: pa.Table, coverage: dict[int, int], *, replace: bool = False) -> PointIndex:
        """New speed increments (typed event columns, event_time_ms, partition, offset)
        appended to the shared map; the new index reads up to `coverage`."""
        spec = self.spec
        increments = {f: {} for f in self.increments} if replace else self.increments
        time_field = spec.events.time_field
        fields = [f for f in spec.events.field_names if f != time_field]
        columns = {n: events.column(n).to_pylist() for n in [*fields, EVENT_TIME_MS, PARTITION, OFFSET]}
        for i in range(events.num_rows):
            event = {f: columns[f][i] for f in fields}
            event[time_field] = columns[EVENT_TIME_MS][i]
            arrived = (columns[PARTITION][i], columns[OFFSET][i], event)
            for field, by_entity in increments.items():
                by_entity.setdefault(event[field], []).append(arrived)
        return PointIndex(spec, self.run_id, self.boundary, dict(coverage), self.gold, increments)

    def states(self, event: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """Every view's states over the event's window, and the entity fields nothing is
        known about."""
        spec = self.spec
        time_field = spec.events.time_field
        time_ms = event[time_field]
        known: set[str] = set()
        states = {}
        for view in spec.views:
            entity = event[view.entity]
            table = ViewStates(view)
            index = self.gold.get(view.name)
            if index is not None:
                window = view.window_buckets_of(time_ms)
                found = index.rows(entity)
                if len(found):
                    known.add(view.entity)
                for row in found:
                    bucket = int(index.buckets[row])
                    if window[0] <= bucket <= window[-1]:
                        table.merge(entity, bucket, {n: exact_int(c[row]) for n, c in
                                                     zip(view.aggregations, index.columns, strict=True)})
            for partition, offset, arrived in self.increments[view.entity].get(entity, ()):
                if self.boundary.get(partition, -1) < offset <= self.coverage.get(partition, -1):
                    table.add(arrived, time_field)
                    known.add(view.entity)
            states[view.name] = table.read(entity, time_ms)
        return states, sorted({v.entity for v in spec.views} - known)

    def snapshot(self) -> dict[str, Any]:
        return {"batch_run_id": self.run_id,
                "boundary": {str(p): o for p, o in sorted(self.boundary.items())},
                "coverage": {str(p): o for p, o in sorted(self.coverage.items())}}


def exact_int(value: Any) -> Any:
    """A monoid state as a Python int (Arrow and DuckDB hand DECIMAL(38,0) back as Decimal)."""
    return value if value is None or isinstance(value, int) else int(value)
