"""The live view: the online store's increments above the published batch run, as serving
reads them.

A published run's gold views hold every event at or below its cut, and the store's epochs
after the cut every event above it (`lakehouse.online`), so gold ⊕ live is exact as of the
coverage vector the store reports with the states: no Delta file is listed, and a read costs
the increments since the run, never the platform's history.

- `live_tables`: every partition's live states (one atomic scan per partition), summed over
  partitions, as one Arrow table per view with gold's columns: what the SQL engines load as
  `speed.<view>_states` (Spark at each `register`, DuckDB when it adopts a run).
- `LiveMirror`: serving's copy of those states, kept per partition with the applied offset
  each was read at, and brought up to date from the store's `changes` since those offsets
  (one pipelined round trip): only the blocks (`block_of`: one view's buckets of one entity,
  one window wide) a step changed since are read, their states replaced in their partitions,
  and the sums over partitions of the buckets
  that differ recomputed (max and min cannot be subtracted, so the partitions' states are
  kept and summed again, never the difference applied). `catch_up` says which rows of
  `speed.<view>_states` change, so
  the DuckDB engine rewrites those rows only: a refresh costs the changes since the last
  one, not the live states (which grow with uptime between batch runs). The mirror holds
  the live states in memory once (per partition; the sum is `speed.<view>_states` itself).
- `LiveSource`: the store, the partitions and the run's cut epochs, for point reads
  (`/v1/predict`, `/v1/entities`: one pipelined round trip per request).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from lakehouse.online.base import BlockKey, BlockStates, OnlineStore, StateKey, StoreRead, block_of, merge_into
from lakehouse.spec import FeatureView, PlatformSpec
from lakehouse.tables import BUCKET, BatchRun
from lakehouse.types import state_arrow_type

__all__ = ["LiveChanges", "LiveMirror", "LiveSource", "LiveTables", "adoptable", "live_schema", "live_tables"]

Row = tuple[Any, int, Sequence[Any]]  # (entity, bucket start, the view's states)


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

    def read(self, keys: Iterable[StateKey], *, whole: bool = False) -> StoreRead:
        """`OnlineStore.read` of every partition after the run's cut."""
        if self.store is None:
            return StoreRead({}, {}, {})
        return self.store.read(keys, range(self.partitions), self.cut_epochs, whole=whole)

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
    rows: dict[str, list[Row]] = {view.name: [] for view in spec.views}
    for (view_name, entity, bucket), values in merged.items():
        rows[view_name].append((entity, bucket, values))
    return LiveTables(_tables(spec, entity_types, rows), coverage, len(merged))


def _tables(spec: PlatformSpec, entity_types: dict[str, pa.DataType],
            rows: dict[str, list[Row]]) -> dict[str, pa.Table]:
    """Per view, its rows as an Arrow table of `live_schema`."""
    tables = {}
    for view in spec.views:
        schema = live_schema(spec, view, entity_types[view.entity])
        found = rows[view.name]
        columns = [[r[0] for r in found], [r[1] for r in found],
                   *[[r[2][i] for r in found] for i in range(len(view.aggregations))]]
        tables[view.name] = pa.Table.from_arrays(
            [pa.array(c, type=f.type) for c, f in zip(columns, schema, strict=True)], schema=schema)
    return tables


@dataclass(frozen=True)
class LiveChanges:
    """How `speed.<view>_states` changes at a catch-up: per view, the (entity, bucket) keys
    whose rows go (changed or emptied) and the rows that then come in (changed or new)."""

    gone: dict[str, pa.Table]  # view → (entity, bucket start) of the rows to delete
    rows: dict[str, pa.Table]  # view → rows of `live_schema` to insert
    coverage: dict[int, int]  # partition → the applied offset the states now include
    states: int  # live (view, entity, bucket) states in all, after the changes

    @property
    def empty(self) -> bool:
        return not any(t.num_rows for t in (*self.gone.values(), *self.rows.values()))


class LiveMirror:
    """The live states of one run (`source.cut_epochs`), per partition, as of the applied
    offsets last read (see the module docstring). Not thread-safe: one refresh at a time."""

    def __init__(self, spec: PlatformSpec, source: LiveSource, entity_types: dict[str, pa.DataType]) -> None:
        assert source.store is not None, "a mirror of a store"
        self.spec = spec
        self.source = source
        self.store: OnlineStore = source.store
        self._entity_types = entity_types
        self._aggregations = {view.name: list(view.aggregations.values()) for view in spec.views}
        self._views = {view.name: view for view in spec.views}
        self._held: dict[int, BlockStates] = {}  # partition → (view, entity, block) → bucket → states
        self._applied: dict[int, int] = {}  # partition → the applied offset its states include
        self.states = 0  # (view, entity, bucket) states of the sum over partitions

    @property
    def coverage(self) -> dict[int, int]:
        return dict(self._applied)

    def load(self) -> LiveTables:
        """Read every live state again (one atomic scan per partition): the full tables."""
        self._held, self._applied = {}, {}
        for p in range(self.source.partitions):
            applied, states = self.store.scan(p, self.source.cut_epochs.get(p, 0))
            held: BlockStates = {}
            for (view, entity, bucket), values in states:
                held.setdefault((view, entity, block_of(self._views[view], bucket)), {})[bucket] = values
            self._held[p], self._applied[p] = held, applied
        rows: dict[str, list[Row]] = {view.name: [] for view in self.spec.views}
        blocks = {key for held in self._held.values() for key in held}
        for key in blocks:
            name, entity, _ = key
            rows[name].extend((entity, bucket, values) for bucket, values in self._summed(key).items())
        self.states = sum(len(found) for found in rows.values())
        return LiveTables(_tables(self.spec, self._entity_types, rows), self.coverage, self.states)

    def catch_up(self) -> LiveChanges | None:
        """Read the changes since the offsets held (one round trip) and apply them: the rows of
        `speed.<view>_states` that change. None when a partition's applied offset went back
        (the store was wiped or rebuilt): the mirror no longer matches it, `load` again."""
        read = self.store.changes(self._applied, self.source.cut_epochs)
        if any(read[p].applied < applied for p, applied in self._applied.items()):
            return None
        # the buckets whose states changed in some partition (a step rewrites a block's
        # every bucket; usually one or two of them differ), and their sums before
        dirty: dict[BlockKey, set[int]] = {}
        for p, changes in read.items():
            held = self._held[p]
            for key, buckets in changes.blocks.items():
                old = held.get(key, {})
                changed = {bucket for bucket, values in buckets.items() if old.get(bucket) != values}
                changed.update(old.keys() - buckets.keys())
                if changed:
                    dirty.setdefault(key, set()).update(changed)
        before = {key: self._bucket_sums(key, buckets) for key, buckets in dirty.items()}
        for p, changes in read.items():
            held = self._held[p]
            for key, buckets in changes.blocks.items():
                if buckets:
                    held[key] = buckets
                else:
                    held.pop(key, None)
            self._applied[p] = changes.applied
        gone: dict[str, list[tuple[Any, int]]] = {view.name: [] for view in self.spec.views}
        rows: dict[str, list[Row]] = {view.name: [] for view in self.spec.views}
        for key, earlier_sums in before.items():
            name, entity, _ = key
            after = self._bucket_sums(key, earlier_sums)
            for bucket, earlier in earlier_sums.items():
                value = after[bucket]
                if value == earlier:
                    continue
                if earlier is not None:
                    gone[name].append((entity, bucket))
                if value is not None:
                    rows[name].append((entity, bucket, value))
                self.states += (value is not None) - (earlier is not None)
        keys = {}
        for view in self.spec.views:
            schema = live_schema(self.spec, view, self._entity_types[view.entity])
            found = gone[view.name]
            keys[view.name] = pa.Table.from_arrays(
                [pa.array([k[0] for k in found], type=schema.field(0).type),
                 pa.array([k[1] for k in found], type=pa.int64())], schema=pa.schema(list(schema)[:2]))
        return LiveChanges(keys, _tables(self.spec, self._entity_types, rows), self.coverage, self.states)

    def _bucket_sums(self, key: BlockKey, buckets: Iterable[int]) -> dict[int, list[Any] | None]:
        """These buckets of one block, each summed over the partitions held (None: none holds
        it). The partitions holding the block are found once (a key entity's events come
        from one partition: its states are that partition's, not a sum)."""
        holders = [found for held in self._held.values() if (found := held.get(key)) is not None]
        if len(holders) == 1:
            only = holders[0]
            return {bucket: only.get(bucket) for bucket in buckets}
        aggregations = self._aggregations[key[0]]
        out: dict[int, list[Any] | None] = {}
        for bucket in buckets:
            total: list[Any] | None = None
            for found in holders:
                values = found.get(bucket)
                if values is not None:
                    total = list(values) if total is None else [
                        a.plus(c, x) for a, c, x in zip(aggregations, total, values, strict=True)]
            out[bucket] = total
        return out

    def _summed(self, key: BlockKey) -> dict[int, list[Any]]:
        """Every bucket of one block, summed over the partitions held."""
        found = [held[key] for held in self._held.values() if key in held]
        if len(found) == 1:
            return found[0]
        aggregations = self._aggregations[key[0]]
        out: dict[int, list[Any]] = {}
        for buckets in found:
            for bucket, values in buckets.items():
                current = out.get(bucket)
                out[bucket] = list(values) if current is None else [
                    a.plus(c, x) for a, c, x in zip(aggregations, current, values, strict=True)]
        return out
