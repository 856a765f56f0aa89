"""The raw tables in SQL (bronze, silver, quarantine, batch runs, scored events, the training
set): a query that names one reads its newest Delta version, and the views' refresh never
reads them, so a refresh does not cost more as their files pile up (scored_events takes a
commit a second per speed member). DuckDB and delta-rs on a temporary lakehouse: no service."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import write_deltalake

import serving.duck
from lakehouse.errors import ServiceError, SqlError
from lakehouse.fraud import FRAUD_SPEC as SPEC
from lakehouse.fraud import TRANSACTIONS
from lakehouse.tables import Lakehouse
from serving.duck import DuckEngine, RawTables

RELATION = f"silver.{TRANSACTIONS.name}"


@pytest.fixture()
def lakehouse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lakehouse]:
    monkeypatch.chdir(tmp_path)
    yield Lakehouse(str(tmp_path / "delta"))


def _append(lakehouse: Lakehouse, first: int, n: int) -> None:
    write_deltalake(lakehouse.silver(TRANSACTIONS.name),
                    pa.table({"event_id": [f"e{i}" for i in range(first, first + n)]}), mode="append")


def _count(engine: DuckEngine) -> int:
    return int(engine.query(f"SELECT count(*) AS n FROM {RELATION}").table.column("n")[0].as_py())


def test_a_query_reads_a_raw_tables_newest_version_without_a_refresh(lakehouse: Lakehouse) -> None:
    engine = DuckEngine(SPEC, lakehouse, store=None)
    engine.refresh()
    with pytest.raises(SqlError):  # not there yet
        engine.query(f"SELECT * FROM {RELATION}")
    _append(lakehouse, 0, 3)
    assert _count(engine) == 3  # appeared after the refresh: its view is made when it is named
    _append(lakehouse, 3, 2)
    assert _count(engine) == 5  # a newer version, no refresh between
    tables = engine.query("SELECT table_schema || '.' || table_name AS t FROM information_schema.tables")
    assert RELATION in tables.table.column("t").to_pylist()
    engine.close()


def test_refreshes_never_read_the_raw_tables(lakehouse: Lakehouse, monkeypatch: pytest.MonkeyPatch) -> None:
    _append(lakehouse, 0, 1)
    engine = DuckEngine(SPEC, lakehouse, store=None)
    engine.refresh()  # the first gives the existing raw tables their views
    assert _count(engine) == 1
    reads: list[set[str]] = []
    current = RawTables.current

    def counted(self: RawTables, names):  # type: ignore[no-untyped-def]
        reads.append(set(names))
        return current(self, names)

    monkeypatch.setattr(RawTables, "current", counted)
    monkeypatch.setattr(serving.duck, "RAW_REFRESH_S", 0.0)  # every refresh looks for new tables
    for i in range(1, 30):
        _append(lakehouse, i, 1)
        engine.refresh(full=True)
    assert reads == []  # 29 versions later: no refresh read a raw table
    assert _count(engine) == 30 and reads == [{RELATION}]  # the query read the one it names
    engine.close()


def test_a_raw_table_that_cannot_be_read_is_a_service_error_naming_it(lakehouse: Lakehouse) -> None:
    _append(lakehouse, 0, 1)
    engine = DuckEngine(SPEC, lakehouse, store=None)
    engine.refresh()
    assert _count(engine) == 1
    log = Path(lakehouse.silver(TRANSACTIONS.name)) / "_delta_log"
    (log / f"{1:020d}.json").write_text("this is not a commit\n")  # the next version, broken
    with pytest.raises(ServiceError, match=f"the raw table {RELATION} cannot be read now"):
        _count(engine)
    assert int(engine.query("SELECT count(*) AS n FROM merged.user_all").table.column("n")[0].as_py()) == 0
    engine.close()
