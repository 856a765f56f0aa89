"""The speed layer's writes to and reads from the lakehouse, through delta-rs (no JVM in a
long-running consumer): the gold views of a published batch run, and appends of the online
store's outbox to `speed/scored_events` under
the table contract of `lakehouse.scored` (one app transaction per consumer group, topic and
partition, whose version is the last offset it covers).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute

from lakehouse.errors import ServiceError
from lakehouse.features import OFFSET, PARTITION
from lakehouse.scored import app_id
from lakehouse.spec import PlatformSpec
from lakehouse.tables import BUCKET, BatchRun, Lakehouse
from speed.state import GoldRow

__all__ = ["append_scored", "append_through", "gold_rows", "now_utc"]


def gold_rows(lakehouse: Lakehouse, spec: PlatformSpec, run: BatchRun) -> Iterator[GoldRow]:
    """Every (view, entity, bucket, state) of a run's views, as it published them."""
    from deltalake import DeltaTable

    for view in spec.views:
        table = DeltaTable(lakehouse.gold(view.name), version=run.view_versions[view.name])
        names = list(view.aggregations)
        data = table.to_pyarrow_table(columns=[view.entity, BUCKET, *names])
        columns = [data.column(n).to_pylist() for n in (view.entity, BUCKET, *names)]
        for entity, bucket, *values in zip(*columns, strict=True):
            yield view.name, entity, bucket, {
                n: (int(v) if v is not None and not isinstance(v, int) else v)
                for n, v in zip(names, values, strict=True)}


def append_scored(lakehouse: Lakehouse, schema: pa.Schema, rows: list[dict[str, Any]],
                  last_offsets: dict[int, int], *, group: str, topic: str, attempts: int = 50) -> int:
    """Append scored rows and record, in the same commit, the last offset consumed per
    partition (also partitions whose records were all invalid: rows may be empty).

    Rows at or below what the table already records for their partition are left out: a
    member that lost a partition in a rebalance while finishing a batch (a zombie) cannot
    write its events twice. The check and the commit are one atomic step (`append_through`):
    a commit that another member made in between for the same partition makes Delta refuse
    this one, and the check runs again. Returns how many rows were written."""
    from deltalake import DeltaTable
    from deltalake.exceptions import CommitFailedError

    for _ in range(attempts):
        try:
            return append_through(DeltaTable(lakehouse.scored_events), schema, rows, last_offsets,
                                  group=group, topic=topic)
        except CommitFailedError:
            continue  # a member committed this group's partition since the snapshot: re-check
    raise ServiceError(f"scored_events: {attempts} commits in a row lost to concurrent writers")


def append_through(snapshot: Any, schema: pa.Schema, rows: list[dict[str, Any]],
                   last_offsets: dict[int, int], *, group: str, topic: str) -> int:
    """The check (each partition's recorded offset in `snapshot`, a DeltaTable) and the
    commit through that same snapshot, with one app transaction per partition: raises
    CommitFailedError when a commit after the snapshot recorded one of these partitions
    (Delta's conflict check on app transactions)."""
    from deltalake import CommitProperties, Transaction, write_deltalake

    recorded: dict[int, int] = {}
    for p in last_offsets:
        version = snapshot.transaction_version(app_id(group, topic, p))
        if version is not None:
            recorded[p] = version
    fresh = [r for r in rows if r[OFFSET] > recorded.get(r[PARTITION], -1)]
    transactions = [Transaction(app_id=app_id(group, topic, p), version=o)
                    for p, o in sorted(last_offsets.items()) if o > recorded.get(p, -1)]
    if not transactions:
        return 0
    write_deltalake(snapshot, pa.Table.from_pylist(fresh, schema=schema), mode="append",
                    schema_mode="merge",  # a table of an older version lacks newer columns
                    commit_properties=CommitProperties(app_transactions=transactions,
                                                       max_commit_retries=20))
    return len(fresh)


def now_utc() -> datetime:
    return datetime.now(UTC)
