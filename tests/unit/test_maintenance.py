"""Delta upkeep with delta-rs on real tables in a temporary directory: compaction keeps every
row and the speed layer's app transactions; VACUUM removes the compacted files, but never
with a retention that would break readers or the files a stream has yet to read."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from batch.maintenance import maintain
from lakehouse.errors import ConfigError, PlatformError
from lakehouse.fraud import FRAUD_SPEC
from lakehouse.tables import Lakehouse


def test_compaction_keeps_rows_and_transactions(tmp_path: Path) -> None:
    from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

    lakehouse = Lakehouse(str(tmp_path))
    path = lakehouse.scored_events
    for i in range(12):  # twelve small appends, like twelve micro-batches
        write_deltalake(path, pa.table({"offset": [i * 10 + j for j in range(10)]}), mode="append",
                        commit_properties=CommitProperties(app_transactions=[
                            Transaction(app_id="g:events:0", version=i * 10 + 9)]))
    assert len(DeltaTable(path).file_uris()) == 12
    done = maintain(lakehouse, FRAUD_SPEC, retention_hours=0, allow_unsafe_retention=True)
    assert [u.table for u in done] == ["speed/scored_events"]  # the only table that exists
    table = DeltaTable(path)
    assert len(table.file_uris()) == 1 and done[0].files_removed_by_compaction == 12
    assert done[0].files_vacuumed == 12
    assert sorted(table.to_pyarrow_table().column("offset").to_pylist()) == list(range(120))
    assert table.transaction_version("g:events:0") == 119


def _bronze(lakehouse: Lakehouse, appends: int) -> str:
    from deltalake import write_deltalake

    path = lakehouse.bronze(FRAUD_SPEC.events.topic)
    for i in range(appends):  # one small file per ingest trigger
        write_deltalake(path, pa.table({"offset": [i]}), mode="append")
    return path


def _stream_checkpoint(lakehouse: Lakehouse, name: str, table_path: str, *, committed: int,
                       reservoir_version: int, starting: bool = False) -> None:
    """A Delta streaming source's checkpoint as Spark writes it: offsets/<batch> (the end
    offset of each planned micro-batch) and commits/<batch> (the ones done)."""
    from deltalake import DeltaTable

    table_id = DeltaTable(table_path).metadata().id
    root = Path(lakehouse.checkpoint(name))
    (root / "offsets").mkdir(parents=True)
    (root / "commits").mkdir()
    (root / "metadata").write_text(json.dumps({"id": "0f7c"}))
    for batch in range(committed + 1):
        offset = {"sourceVersion": 1, "reservoirId": table_id,
                  "reservoirVersion": reservoir_version if batch == committed else batch,
                  "index": -1, "isStartingVersion": starting}
        (root / "offsets" / str(batch)).write_text(
            "v1\n" + json.dumps({"batchWatermarkMs": 0, "batchTimestampMs": 0, "conf": {}})
            + "\n" + json.dumps(offset))
        (root / "commits" / str(batch)).write_text('v1\n{"nextBatchWatermarkMs":0}')


def test_a_retention_below_deltas_safe_minimum_is_refused_before_anything_changes(
        tmp_path: Path) -> None:
    from deltalake import DeltaTable

    lakehouse = Lakehouse(str(tmp_path))
    path = _bronze(lakehouse, 3)
    with pytest.raises(ConfigError) as refused:
        maintain(lakehouse, FRAUD_SPEC, retention_hours=24)
    message = str(refused.value)
    assert "LAMBDALAKE_DELTA_VACUUM_RETENTION_HOURS=24" in message and "168" in message
    assert "LAMBDALAKE_DELTA_VACUUM_ALLOW_UNSAFE_RETENTION=true" in message
    assert DeltaTable(path).version() == 2  # not even compacted


def test_vacuum_never_deletes_files_the_validate_stream_has_yet_to_read(tmp_path: Path) -> None:
    """validate has read bronze up to version 2; versions 3..5 are still to be read. OPTIMIZE
    compacts their files away, and a short retention would then let VACUUM delete the files
    the stream needs: it is refused (with what to do), and nothing is deleted."""
    from deltalake import DeltaTable

    lakehouse = Lakehouse(str(tmp_path))
    path = _bronze(lakehouse, 6)
    _stream_checkpoint(lakehouse, "validate-transactions", path, committed=1, reservoir_version=3)
    files = {p.name for p in Path(path).glob("*.parquet")}
    with pytest.raises(PlatformError) as refused:
        maintain(lakehouse, FRAUD_SPEC, retention_hours=0, allow_unsafe_retention=True)
    message = str(refused.value)
    assert "bronze/" in message and "validate-transactions" in message
    assert "version 3" in message and "batch validate" in message
    assert files <= {p.name for p in Path(path).glob("*.parquet")}  # nothing deleted
    table = DeltaTable(path)
    assert sorted(table.to_pyarrow_table().column("offset").to_pylist()) == list(range(6))
    for version in range(3, 6):  # every version the stream has yet to read is still readable
        assert DeltaTable(path, version=version).to_pyarrow_table().num_rows == version + 1


def test_vacuum_goes_ahead_once_the_stream_has_read_everything(tmp_path: Path) -> None:
    from deltalake import DeltaTable

    lakehouse = Lakehouse(str(tmp_path))
    path = _bronze(lakehouse, 6)
    _stream_checkpoint(lakehouse, "validate-transactions", path, committed=2, reservoir_version=6)
    done = maintain(lakehouse, FRAUD_SPEC, retention_hours=0, allow_unsafe_retention=True)
    assert [(u.table, u.files_vacuumed) for u in done] == [(f"bronze/{FRAUD_SPEC.events.topic}", 6)]
    assert len(DeltaTable(path).file_uris()) == 1


def test_a_stream_still_reading_its_initial_snapshot_keeps_that_snapshot(tmp_path: Path) -> None:
    lakehouse = Lakehouse(str(tmp_path))
    path = _bronze(lakehouse, 4)
    # batch 0 (the snapshot of version 3) planned, not committed: a restart reads it again
    _stream_checkpoint(lakehouse, "validate-transactions", path, committed=0, reservoir_version=3,
                       starting=True)
    (Path(lakehouse.checkpoint("validate-transactions")) / "commits" / "0").unlink()
    with pytest.raises(PlatformError, match="version 3"):
        maintain(lakehouse, FRAUD_SPEC, retention_hours=0, allow_unsafe_retention=True)
    assert len(list(Path(path).glob("*.parquet"))) == 5  # four appends and the compacted file
