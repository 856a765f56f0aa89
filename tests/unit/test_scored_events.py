"""speed/scored_events (delta-rs on a temporary lakehouse): the zombie-writer guard checks
and commits through one snapshot, so a revoked member cannot write rows twice."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError

from lakehouse.fraud import FRAUD_SPEC
from lakehouse.scored import ensure_scored_table, resume_offsets, scored_schema
from lakehouse.tables import Lakehouse
from speed import lake

GROUP, TOPIC = "g", FRAUD_SPEC.events.topic
SCHEMA = scored_schema(FRAUD_SPEC)


def rows(partition: int, offsets: range) -> list[dict[str, Any]]:
    return [{"event_id": f"e-{partition}-{o}", "user_id": "u", "merchant_id": "m",
             "merchant_category": "grocery", "amount": 100, "currency": "EUR", "country": "DE",
             "channel": "pos", "event_time": 1_767_225_600_000_000, "partition": partition, "offset": o,
             "kafka_timestamp": None, "features": [0.0], "score": 0.5, "model_version": 1,
             "batch_run_id": None, "consumer_group": GROUP, "scored_at": datetime.now(UTC),
             "feature_ms": 0.0, "model_ms": 0.0} for o in offsets]


def scored(lakehouse: Lakehouse) -> list[tuple[int, int]]:
    table = DeltaTable(lakehouse.scored_events).to_pyarrow_table(columns=["partition", "offset"])
    return sorted(zip(table.column("partition").to_pylist(), table.column("offset").to_pylist(), strict=True))


@pytest.fixture
def lakehouse(tmp_path: Path) -> Lakehouse:
    lakehouse = Lakehouse(str(tmp_path))
    ensure_scored_table(lakehouse, SCHEMA)
    return lakehouse


def test_a_zombie_that_checked_before_the_new_owner_committed_writes_nothing(lakehouse: Lakehouse) -> None:
    """The interleaving: the old owner of partition 0 checks (nothing recorded above 49),
    the group rebalances, the new owner scores offsets 50..99 and commits, then the old
    owner commits the same 50 events from the snapshot it checked."""
    lake.append_scored(lakehouse, SCHEMA, rows(0, range(50)), {0: 49}, group=GROUP, topic=TOPIC)
    checked_by_zombie = DeltaTable(lakehouse.scored_events)
    assert lake.append_scored(lakehouse, SCHEMA, rows(0, range(50, 100)), {0: 99}, group=GROUP, topic=TOPIC) == 50
    with pytest.raises(CommitFailedError):
        lake.append_through(checked_by_zombie, SCHEMA, rows(0, range(50, 100)), {0: 99}, group=GROUP, topic=TOPIC)
    # append_scored starts over from a fresh snapshot and finds the partition written
    assert lake.append_scored(lakehouse, SCHEMA, rows(0, range(50, 100)), {0: 99}, group=GROUP, topic=TOPIC) == 0
    assert scored(lakehouse) == [(0, o) for o in range(100)]  # each event once


def test_members_committing_other_partitions_do_not_conflict(lakehouse: Lakehouse) -> None:
    snapshot = DeltaTable(lakehouse.scored_events)
    lake.append_scored(lakehouse, SCHEMA, rows(1, range(10)), {1: 9}, group=GROUP, topic=TOPIC)
    assert lake.append_through(snapshot, SCHEMA, rows(0, range(10)), {0: 9}, group=GROUP, topic=TOPIC) == 10
    assert resume_offsets(lakehouse, GROUP, TOPIC, [0, 1, 2]) == {0: 10, 1: 10, 2: 0}
