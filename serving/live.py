"""The live view: the online store's increments above the published batch run, as serving
reads them.

A published run's gold views hold every event at or below its cut, and the store's epochs
after the cut every event above it (`lakehouse.online`), so gold ⊕ live is exact as of the
coverage vector the store reports with the states: no Delta file is listed, and a read costs
the increments since the run, never the platform's history.

- `live_tables`: every partition's live states (one atomic scan per partition), summed over
  partitions, as one Arrow table per view with gold's columns: what the SQL engines load as
  `speed.<view>_states`.
- `LiveSource`: the store, the partitions and the run's cut epochs, for point reads
  (`/v1/predict`, `/v1/entities`: one pipelined round trip per request).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from lakehouse.online.base import OnlineStore, StateKey, StoreRead, merge_into
from lakehouse.spec import FeatureView, PlatformSpec
from lakehouse.tables import BUCKET, BatchRun
from lakehouse.types import state_arrow_type

__all__ = ["LiveSource", "LiveTables", "adoptable", "live_schema", "live_tables"]


def live_schema(spec: PlatformSpec, view: FeatureView, entity_type: pa.DataType) -> pa.Schema:
    """`speed.<view>_states`: gold's columns without the run id."""
    del spec
    return pa.schema([pa.field(view.entity, entity_type), pa.field(BUCKET, pa.int64()),
                      *[pa.field(n, state_arrow_type(a)) for n, a in view.aggregations.items()]])


def adoptable(run: BatchRun, spec: PlatformSpec, store: OnlineStore | None) -> bool:
    """Whether serving may merge a run: of this spec, and, with a store, one that cut it
    (without a cut, gold ⊕ every epoch would count events twice)."""
    return run.spec_fingerprint == spec.fingerprint() and (store is None or bool(run.cut_epochs))


@dataclass(frozen=True)
class LiveSource:
    """Point reads of the live view of one run (`cut_epochs`; {}: no run, every epoch)."""

    store: OnlineStore | None
    partitions: int
    cut_epochs: dict[int, int]

    def read(self, keys: Iterable[StateKey]) -> StoreRead:
        if self.store is None:
            return StoreRead({}, {}, {})
        return self.store.read(keys, range(self.partitions), self.cut_epochs)

    def coverage(self) -> dict[int, int]:
        """The store's applied offsets now (no states read)."""
        return self.read(()).coverage


@dataclass(frozen=True)
class LiveTables:
    tables: dict[str, pa.Table]  # view name → speed.<view>_states
    coverage: dict[int, int]  # partition → the applied offset the states include
    states: int  # (view, entity, bucket) states in all


def live_tables(source: LiveSource, spec: PlatformSpec, entity_types: dict[str, pa.DataType]) -> LiveTables:
    """Every live state of the run, per view (see the module docstring)."""
    merged: dict[StateKey, list[Any]] = {}
    coverage: dict[int, int] = {}
    if source.store is not None:
        for p in range(source.partitions):
            applied, states = source.store.scan(p, source.cut_epochs.get(p, 0))
            coverage[p] = applied
            for key, values in states:
                merge_into(spec, merged, key, values)
    rows: dict[str, list[tuple[Any, int, list[Any]]]] = {view.name: [] for view in spec.views}
    for (view_name, entity, bucket), values in merged.items():
        rows[view_name].append((entity, bucket, values))
    tables = {}
    for view in spec.views:
        schema = live_schema(spec, view, entity_types[view.entity])
        found = rows[view.name]
        columns = [[r[0] for r in found], [r[1] for r in found],
                   *[[r[2][i] for r in found] for i in range(len(view.aggregations))]]
        tables[view.name] = pa.Table.from_arrays(
            [pa.array(c, type=f.type) for c, f in zip(columns, schema, strict=True)], schema=schema)
    return LiveTables(tables, coverage, len(merged))
