"""`lambdalake speed rebuild`: re-derive a speed group's online store from the lakehouse,
exactly, after the store lost its state (wiped, or restored from an older copy).

Per partition of the events topic, with the newest published run (its cut and cut epochs):

- the applied offset is what `speed/scored_events` holds for the group (its app
  transaction), or the run's cut where that is higher (a floored partition);
- the open epoch, the one after the run's cut, holds the monoid states of the scored rows
  above the cut through that offset (the rows hold the typed events);
- the seen set holds the identities, with their clocks, of silver's events at or below the
  cut and of those rows, within the dedup horizon of the latest clock (`lakehouse.dedup`).

Scored rows the lost store had not yet flushed to Delta are not restored: their records lie
above the restored applied offset, so the speed layer consumes and scores them again when it
resumes. Stop the speed layer first: a member stepping while the store is rebuilt is
refused (`StoreBehindError`) and stops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from lakehouse.dedup import CLOCK, NO_CLOCK, forgettable_below
from lakehouse.features import OFFSET, PARTITION
from lakehouse.online.base import OnlineStore, event_identity, increments_of
from lakehouse.scored import app_id
from lakehouse.spec import PlatformSpec
from lakehouse.tables import Lakehouse, published_runs

__all__ = ["Rebuilt", "rebuild_store"]


@dataclass(frozen=True)
class Rebuilt:
    run_id: str | None
    applied: dict[int, int]  # partition → the applied offset restored
    events: int  # scored events folded back into the store
    identities: int  # identities restored to the seen sets


def rebuild_store(store: OnlineStore, spec: PlatformSpec, lakehouse: Lakehouse, *, partitions: int,
                  echo: Callable[[str], None] = lambda line: None) -> Rebuilt:
    """Wipe the group's store and re-derive it (see the module docstring)."""
    from deltalake import DeltaTable

    run = next((r for r in published_runs(lakehouse)
                if r.spec_fingerprint == spec.fingerprint() and r.cut_epochs), None)
    cut = run.boundary if run is not None else {}
    cut_epochs = run.cut_epochs if run is not None else {}
    scored = DeltaTable(lakehouse.scored_events) if DeltaTable.is_deltatable(lakehouse.scored_events) else None
    silver_path = lakehouse.silver(spec.events.name)
    silver = DeltaTable(silver_path) if DeltaTable.is_deltatable(silver_path) else None
    store.wipe()
    applied: dict[int, int] = {}
    events = identities = 0
    for p in range(partitions):
        low = cut.get(p, -1)
        recorded = scored.transaction_version(app_id(store.group, store.topic, p)) if scored is not None else None
        high = max(low, -1 if recorded is None else recorded)
        rows = _scored_events(scored, spec, store.group, p, low, high) if scored is not None else []
        clocked = [(event_identity(spec.events, row), _ms(row.pop(CLOCK))) for row in rows]
        if silver is not None and low >= 0:
            history = silver.to_pyarrow_table(columns=[spec.events.key_field, spec.events.id_field, CLOCK],
                                              filters=[(PARTITION, "=", p), (OFFSET, "<=", low)])
            clocked += [(event_identity(spec.events, row), _ms(row[CLOCK])) for row in history.to_pylist()]
        below = forgettable_below(max((c for _, c in clocked), default=NO_CLOCK), spec.events.dedup_horizon_ms)
        seen = dict(clocked if below is None else [(i, c) for i, c in clocked if c >= below])
        store.restore(p, epoch=cut_epochs.get(p, 0) + 1, applied=high, increments=increments_of(spec, rows),
                      seen=seen)
        applied[p], events, identities = high, events + len(rows), identities + len(seen)
        echo(f"partition {p}: applied through {high}; {len(rows)} scored events above the cut {low}, "
             f"{len(seen)} identities")
    return Rebuilt(run.run_id if run is not None else None, applied, events, identities)


def _ms(value: datetime | None) -> int:
    return NO_CLOCK if value is None else (value - _EPOCH) // timedelta(milliseconds=1)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _scored_events(table: Any, spec: PlatformSpec, group: str, partition: int, low: int,
                   high: int) -> list[dict[str, Any]]:
    """The group's scored events of a partition with low < offset <= high, typed as the
    speed layer parsed them (event time in epoch milliseconds)."""
    if high <= low:
        return []
    data = table.to_pyarrow_table(
        columns=[*spec.events.field_names, CLOCK],
        filters=[(PARTITION, "=", partition), (OFFSET, ">", low), (OFFSET, "<=", high),
                 ("consumer_group", "=", group)])
    time_field = spec.events.time_field
    index = data.schema.get_field_index(time_field)
    micros = data.column(time_field).cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
    data = data.set_column(index, time_field, pc.divide(micros, 1000))  # exact ms
    rows: list[dict[str, Any]] = data.to_pylist()  # with the event's clock (a datetime)
    return rows
