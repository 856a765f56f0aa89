"""Point lookups for /predict and /v1/entities: one entity's states without a SQL scan.

A `PointIndex` is built when a batch run is published: each gold view sorted by entity (a
binary search finds an entity's rows). Everything above the run's cut comes from the online
store at each lookup (`serving.live.LiveSource`: one pipelined round trip), so a lookup is as
fresh as the speed layer's last step and says which coverage vector it reflects.

Lookups fold exactly as the speed layer does (`ViewStates.merge` for gold rows and the
store's states): one definition of a feature.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lakehouse.features import ViewStates
from lakehouse.online.base import StateKey
from lakehouse.spec import FeatureView, PlatformSpec
from lakehouse.tables import BUCKET
from serving.live import LiveSource


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
    gold: dict[str, GoldIndex]
    live: LiveSource

    @classmethod
    def empty(cls, spec: PlatformSpec, live: LiveSource) -> PointIndex:
        return cls(spec, None, {}, {}, live)

    def with_run(self, run_id: str, boundary: dict[int, int], cut_epochs: dict[int, int],
                 gold: Mapping[str, pa.Table]) -> PointIndex:
        """A new batch run: its gold views, and the store's epochs after its cut."""
        views = {v.name: GoldIndex(v, gold[v.name]) for v in self.spec.views}
        live = LiveSource(self.live.store, self.live.partitions, dict(cut_epochs))
        return PointIndex(self.spec, run_id, dict(boundary), views, live)

    def gold_states(self, view: FeatureView, entity: Any) -> ViewStates:
        """Every gold bucket of one entity in one view."""
        table = ViewStates(view)
        index = self.gold.get(view.name)
        if index is not None:
            for row in index.rows(entity):
                table.merge(entity, int(index.buckets[row]), {n: exact_int(c[row]) for n, c in
                                                             zip(view.aggregations, index.columns, strict=True)})
        return table

    def entity_states(self, keys: list[StateKey], *,
                      whole: bool = False) -> tuple[dict[tuple[str, Any], ViewStates], dict[int, int]]:
        """Per (view, entity) of `keys`: gold's every bucket ⊕ the live buckets of the blocks
        that hold the keys' buckets (`whole`: every live bucket); and the coverage vector of
        the store read."""
        read = self.live.read(keys, whole=whole)
        out: dict[tuple[str, Any], ViewStates] = {}
        for view_name, entity, _ in keys:
            if (view_name, entity) not in out:
                out[(view_name, entity)] = self.gold_states(self.spec.view(view_name), entity)
        for (view_name, entity, _), buckets in read.blocks.items():
            out[(view_name, entity)].merge_block(entity, buckets)
        return out, {**self.boundary, **read.coverage}

    def states(self, event: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], list[str], dict[int, int]]:
        """Every view's states over the event's window, the entity fields nothing is known
        about, and the coverage vector read."""
        spec = self.spec
        time_ms = event[spec.events.time_field]
        keys = [(view.name, event[view.entity], bucket)
                for view in spec.views for bucket in view.window_buckets_of(time_ms)]
        found, coverage = self.entity_states(keys)
        known: set[str] = set()
        states = {}
        for view in spec.views:
            table = found[(view.name, event[view.entity])]
            if len(table):
                known.add(view.entity)
            states[view.name] = table.read(event[view.entity], time_ms)
        return states, sorted({v.entity for v in spec.views} - known), coverage

    def snapshot(self, coverage: dict[int, int]) -> dict[str, Any]:
        return {"batch_run_id": self.run_id,
                "boundary": {str(p): o for p, o in sorted(self.boundary.items())},
                "coverage": {str(p): o for p, o in sorted(coverage.items())}}


def exact_int(value: Any) -> Any:
    """A monoid state as a Python int (Arrow and DuckDB hand DECIMAL(38,0) back as Decimal)."""
    return value if value is None or isinstance(value, int) else int(value)
