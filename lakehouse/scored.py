"""The contract of `speed/scored_events`, the table the speed layer writes and the serving
layer reads: its schema, its app transactions, and what they say (where each partition
resumes, how far the merged views reach).

scored_events holds one row per scored event: the typed event (every spec field), its
Kafka partition and offset, the feature vector, score, model version, the batch run whose
views it was scored on, and timings. Each append carries one Delta app transaction per
(consumer group, topic, partition) whose version is the last offset it covers, so the
table itself says where each partition resumes, and a replayed batch is recognised.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from lakehouse.dedup import CLOCK
from lakehouse.features import OFFSET, PARTITION
from lakehouse.spec import PlatformSpec
from lakehouse.tables import BATCH_RUN_ID, Lakehouse
from lakehouse.types import typed_arrow_schema

__all__ = ["app_id", "coverage", "ensure_scored_table", "resume_offsets", "scored_schema"]


def app_id(group: str, topic: str, partition: int) -> str:
    return f"{group}:{topic}:{partition}"


def resume_offsets(lakehouse: Lakehouse, group: str, topic: str, partitions: list[int]) -> dict[int, int]:
    """Next offset to consume per partition, from the table's app transactions (0 where the
    partition was never written)."""
    from deltalake import DeltaTable

    path = lakehouse.scored_events
    if not DeltaTable.is_deltatable(path):
        return {p: 0 for p in partitions}
    table = DeltaTable(path)
    out = {}
    for p in partitions:
        last = table.transaction_version(app_id(group, topic, p))
        out[p] = 0 if last is None else last + 1
    return out


def coverage(table: Any, boundary: dict[int, int], *, group: str, topic: str,
             partitions: int) -> dict[int, int]:
    """Per partition, the highest offset the merged views include: the batch boundary, or
    further where the group's app transaction on `table` (scored_events) says it consumed."""
    out = dict(boundary)
    for p in range(max([partitions - 1, *boundary]) + 1):
        consumed = table.transaction_version(app_id(group, topic, p))
        if consumed is not None and consumed > out.get(p, -1):
            out[p] = consumed
    return out


def scored_schema(spec: PlatformSpec) -> pa.Schema:
    return pa.schema([
        *typed_arrow_schema(spec.events),
        pa.field(PARTITION, pa.int32(), nullable=False),
        pa.field(OFFSET, pa.int64(), nullable=False),
        pa.field("kafka_timestamp", pa.timestamp("us", tz="UTC")),
        pa.field(CLOCK, pa.timestamp("us", tz="UTC")),  # the event's clock (lakehouse.dedup)
        pa.field("features", pa.list_(pa.float64()), nullable=False),
        # per partition, the highest offset the features include (the event's own: the one before it)
        pa.field("coverage", pa.map_(pa.int32(), pa.int64())),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("model_version", pa.int64(), nullable=False),
        pa.field(BATCH_RUN_ID, pa.string()),
        pa.field("consumer_group", pa.string(), nullable=False),
        pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("feature_ms", pa.float64(), nullable=False),
        pa.field("model_ms", pa.float64(), nullable=False),
    ])


def ensure_scored_table(lakehouse: Lakehouse, schema: pa.Schema) -> None:
    """Create speed/scored_events if missing (two members may race to: one wins)."""
    from deltalake import DeltaTable

    path = lakehouse.scored_events
    if DeltaTable.is_deltatable(path):
        return
    try:
        DeltaTable.create(path, schema, mode="ignore")
    except Exception:
        if not DeltaTable.is_deltatable(path):
            raise
