"""Delta upkeep with delta-rs on real tables in a temporary directory: compaction keeps every
row and the speed layer's app transactions; VACUUM removes the compacted files."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from lakehouse.fraud import FRAUD_SPEC
from lakehouse.maintenance import maintain
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
    done = maintain(lakehouse, FRAUD_SPEC, retention_hours=0)
    assert [u.table for u in done] == ["speed/scored_events"]  # the only table that exists
    table = DeltaTable(path)
    assert len(table.file_uris()) == 1 and done[0].files_removed_by_compaction == 12
    assert done[0].files_vacuumed == 12
    assert sorted(table.to_pyarrow_table().column("offset").to_pylist()) == list(range(120))
    assert table.transaction_version("g:events:0") == 119
