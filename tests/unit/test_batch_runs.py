"""Publishing batch runs (delta-rs on a temporary lakehouse): newest means commit order, a
boundary never goes back, and two publishers racing from one snapshot cannot both win."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError

from lakehouse.tables import (
    BatchRun,
    Lakehouse,
    RunLog,
    StaleRunError,
    _batch_runs_schema,
    latest_run,
    publish_run,
    publish_through,
    published_runs,
)

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def run(name: str, boundary: dict[int, int], *, finished: datetime = NOW) -> BatchRun:
    return BatchRun(run_id=name, boundary=boundary, view_versions={"v": 1}, source_versions={},
                    row_counts={}, durations_s={}, spec_fingerprint="f", finished_at=finished)


@pytest.fixture
def lakehouse(tmp_path: Path) -> Lakehouse:
    return Lakehouse(str(tmp_path))


def test_newest_is_commit_order_not_the_clock(lakehouse: Lakehouse) -> None:
    publish_run(lakehouse, run("first", {0: 10}, finished=NOW + timedelta(hours=1)))  # a fast clock
    second = publish_run(lakehouse, run("second", {0: 20}, finished=NOW))
    assert second.sequence == 2
    assert latest_run(lakehouse) == second
    assert [r.run_id for r in published_runs(lakehouse)] == ["second", "first"]


def test_a_run_log_sees_new_runs_and_decodes_only_when_one_was_published(lakehouse: Lakehouse) -> None:
    log = RunLog(lakehouse)
    assert log.runs() == []  # before the first run: no table yet
    publish_run(lakehouse, run("first", {0: 10}))
    first = log.runs()
    assert [r.run_id for r in first] == ["first"]
    assert log.runs() is first  # nothing new: the same runs, not decoded again
    publish_run(lakehouse, run("second", {0: 20}))
    assert [r.run_id for r in log.runs()] == ["second", "first"] == [r.run_id for r in published_runs(lakehouse)]


def test_cut_epochs_round_trip_and_rows_written_before_them_read_as_none_cut(lakehouse: Lakehouse) -> None:
    import pyarrow as pa
    from deltalake import write_deltalake

    old = run("old", {0: 10})
    row = {"run_id": old.run_id, "boundary": [(0, 10)], "view_versions": [("v", 1)], "source_versions": [],
           "row_counts": [], "durations_s": [], "spec_fingerprint": "f", "finished_at": NOW, "sequence": 1}
    schema = pa.schema([f for f in _batch_runs_schema() if f.name != "cut_epochs"])  # before the column
    write_deltalake(lakehouse.batch_runs, pa.Table.from_pylist([row], schema=schema))
    assert published_runs(lakehouse)[0].cut_epochs == {}
    cut = dataclasses.replace(run("cut", {0: 12, 1: 3}), cut_epochs={0: 4, 1: 2, 2: 1})
    published = publish_run(lakehouse, cut)
    assert published.sequence == 2
    assert [(r.run_id, r.cut_epochs) for r in published_runs(lakehouse)] == [
        ("cut", {0: 4, 1: 2, 2: 1}), ("old", {})]


def test_a_boundary_below_the_published_one_is_refused(lakehouse: Lakehouse) -> None:
    publish_run(lakehouse, run("wide", {0: 20, 1: 5}))
    publish_run(lakehouse, run("same", {0: 20, 1: 5}))  # equal is fine (nothing new)
    with pytest.raises(StaleRunError, match=r"partition\(s\) 1 \(4 < 5\)"):
        publish_run(lakehouse, run("older", {0: 30, 1: 4}))
    with pytest.raises(StaleRunError, match=r"partition\(s\) 1 \(-1 < 5\)"):
        publish_run(lakehouse, run("missing", {0: 30}))
    assert latest_run(lakehouse).run_id == "same"  # type: ignore[union-attr]


def test_two_overlapping_runs_cannot_both_publish_from_one_snapshot(lakehouse: Lakehouse) -> None:
    """The interleaving: B checks at a snapshot, A publishes a wider run, then B commits."""
    publish_run(lakehouse, run("base", {0: 5}))
    checked_by_b = DeltaTable(lakehouse.batch_runs)
    publish_run(lakehouse, run("a", {0: 30}))
    with pytest.raises(CommitFailedError):  # Delta's conflict check: same app transaction
        publish_through(lakehouse, checked_by_b, run("b", {0: 20}))
    with pytest.raises(StaleRunError):  # checked again against what A published
        publish_run(lakehouse, run("b", {0: 20}))
    assert [r.run_id for r in published_runs(lakehouse)] == ["a", "base"]
    wider = publish_run(lakehouse, run("c", {0: 40}))
    assert (wider.sequence, latest_run(lakehouse)) == (3, wider)
