"""The embedded SQL engine over real Delta tables (delta-rs, in a temporary directory; no
services): merged views equal a plain recomputation over the events they cover, whatever
the boundary and however far the speed layer got; refreshes are incremental; SQL is
read-only and bounded."""

from __future__ import annotations

import dataclasses
import zlib
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from lakehouse import scored
from lakehouse.errors import SqlError, SqlTimeout
from lakehouse.fraud import FRAUD_SPEC
from lakehouse.generator import GeneratorOptions, generate
from lakehouse.tables import BUCKET, BatchRun, Lakehouse, publish_run
from serving.duck import DuckEngine, gold_schema
from speed import lake
from tests.oracle import states_by_view, window_states

GROUP, PARTITIONS = "speed-test", 4
SPEC = FRAUD_SPEC


@dataclasses.dataclass
class Arrived:
    partition: int
    offset: int
    event: dict[str, Any]


def stream(events: int = 900, seed: int = 5) -> list[Arrived]:
    """Valid transactions as Kafka would hold them: keyed by user, offsets per partition."""
    offsets: dict[int, int] = defaultdict(int)
    out = []
    for m in generate(GeneratorOptions(events=events, seed=seed, malformed_fraction=0.0,
                                       duplicate_fraction=0.0, late_fraction=0.05)):
        if m.topic != SPEC.events.topic:
            continue
        partition = zlib.crc32(m.key) % PARTITIONS
        out.append(Arrived(partition, offsets[partition], SPEC.events.parse(m.value)))
        offsets[partition] += 1
    return out


def covered(arrived: list[Arrived], coverage: dict[int, int]) -> list[dict[str, Any]]:
    """The events at or below `coverage[partition]`."""
    return [a.event for a in arrived if a.offset <= coverage.get(a.partition, -1)]


def recompute(arrived: list[Arrived], coverage: dict[int, int]) -> dict[str, dict[tuple[Any, int], dict[str, int]]]:
    """Every view's states per (entity, bucket) over the covered events, by the test oracle."""
    return states_by_view(SPEC.views, covered(arrived, coverage), SPEC.events.time_field)


def merged_states(engine: DuckEngine) -> dict[str, dict[tuple[Any, int], dict[str, int]]]:
    out = {}
    for view in SPEC.views:
        rows = engine.query(f"SELECT * FROM merged.{view.name}_states", row_cap=10**6).table.to_pylist()
        out[view.name] = {(r[view.entity], r[BUCKET]): {n: int(r[n]) for n in view.aggregations} for r in rows}
    return out


class Lake:
    """Writes what the batch and speed layers would, with delta-rs."""

    def __init__(self, root: Path) -> None:
        self.lakehouse = Lakehouse(str(root))
        self.schema = scored.scored_schema(SPEC)
        self.runs = 0

    def publish_run(self, arrived: list[Arrived], boundary: dict[int, int]) -> None:
        from deltalake import write_deltalake

        versions = {}
        tables = recompute(arrived, boundary)  # the oracle's states: never the fold under test
        for view in SPEC.views:
            rows = [{view.entity: entity, BUCKET: bucket, **state, "batch_run_id": f"run-{self.runs}"}
                    for (entity, bucket), state in tables[view.name].items()]
            write_deltalake(self.lakehouse.gold(view.name),
                            pa.Table.from_pylist(rows, schema=gold_schema(SPEC, view)), mode="overwrite")
            from deltalake import DeltaTable
            versions[view.name] = DeltaTable(self.lakehouse.gold(view.name)).version()
        self.runs += 1
        publish_run(self.lakehouse, BatchRun(
            run_id=f"run-{self.runs}", boundary=dict(boundary), view_versions=versions, source_versions={},
            row_counts={}, durations_s={}, spec_fingerprint=SPEC.fingerprint(),
            finished_at=datetime(2026, 1, 1, 0, self.runs, tzinfo=UTC)))

    def score(self, arrived: list[Arrived], *, group: str = GROUP) -> None:
        """The speed layer's append of one micro-batch (with its app transactions)."""
        scored.ensure_scored_table(self.lakehouse, self.schema)
        rows = [{**a.event, "event_time": a.event["event_time"] * 1000, "partition": a.partition,
                 "offset": a.offset, "kafka_timestamp": None, "features": [0.0], "score": 0.5,
                 "model_version": 1, "batch_run_id": None, "consumer_group": group,
                 "scored_at": datetime.now(UTC), "feature_ms": 0.0, "model_ms": 0.0}
                for a in arrived]
        last = {}
        for a in arrived:
            last[a.partition] = max(last.get(a.partition, -1), a.offset)
        lake.append_scored(self.lakehouse, self.schema, rows, last, group=group, topic=SPEC.events.topic)


def upto(arrived: list[Arrived], limits: dict[int, int]) -> list[Arrived]:
    return [a for a in arrived if a.offset <= limits.get(a.partition, -1)]


def between(arrived: list[Arrived], low: dict[int, int], high: dict[int, int]) -> list[Arrived]:
    return [a for a in arrived if low.get(a.partition, -1) < a.offset <= high.get(a.partition, -1)]


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[Lake, DuckEngine, list[Arrived]]:
    written = Lake(tmp_path / "delta")
    engine = DuckEngine(SPEC, written.lakehouse, group=GROUP, partitions=PARTITIONS)
    return written, engine, stream()


def positions(arrived: list[Arrived], share: float) -> dict[int, int]:
    ends: dict[int, int] = defaultdict(lambda: -1)
    for a in arrived:
        ends[a.partition] = max(ends[a.partition], a.offset)
    return {p: int(e * share) for p, e in ends.items()}


def test_merged_views_are_exact_at_every_moment(setup: tuple[Lake, DuckEngine, list[Arrived]]) -> None:
    written, engine, arrived = setup
    assert engine.refresh().run_id is None  # nothing yet: empty views, no error
    assert merged_states(engine) == recompute(arrived, {})

    b1 = positions(arrived, 0.4)
    written.publish_run(arrived, b1)
    # the speed layer behind the batch boundary: the views are the batch views
    written.score(upto(arrived, positions(arrived, 0.2)))
    snapshot = engine.refresh()
    assert snapshot.coverage == b1 and snapshot.increments == 0
    assert merged_states(engine) == recompute(arrived, b1)

    # the speed layer past the boundary, in three micro-batches with refreshes between
    previous = positions(arrived, 0.2)
    for share in (0.5, 0.6, 0.75):
        now = positions(arrived, share)
        written.score(between(arrived, previous, now))
        previous = now
        snapshot = engine.refresh()
        assert snapshot.coverage == now
        assert snapshot.increments == len(between(arrived, b1, now))
        assert merged_states(engine) == recompute(arrived, now)

    # a new run right after publish: increments at or below its boundary are dropped
    b2 = positions(arrived, 0.6)
    written.publish_run(arrived, b2)
    snapshot = engine.refresh()
    assert snapshot.run_id == "run-2" and snapshot.boundary == b2
    assert snapshot.increments == len(between(arrived, b2, previous))
    assert merged_states(engine) == recompute(arrived, previous)

    # a run past the speed layer, which then catches up
    b3 = positions(arrived, 0.9)
    written.publish_run(arrived, b3)
    assert engine.refresh().increments == 0
    assert merged_states(engine) == recompute(arrived, b3)
    everything = positions(arrived, 1.0)
    written.score(between(arrived, previous, everything))
    assert engine.refresh().coverage == everything
    assert merged_states(engine) == recompute(arrived, everything)


def windows(expected: dict[str, dict[tuple[Any, int], dict[str, int]]], view: Any) -> dict[Any, int]:
    """Per entity, the count over the view's window ending at the entity's own newest bucket."""
    ends: dict[Any, int] = {}
    for entity, bucket in expected[view.name]:
        ends[entity] = max(ends.get(entity, bucket), bucket)
    out: dict[Any, int] = defaultdict(int)
    for (entity, bucket), state in expected[view.name].items():
        if bucket > ends[entity] - view.bucket_ms * view.window_buckets:
            out[entity] += state["count"]
    return dict(out)


def merged_windows(engine: DuckEngine, view: Any) -> dict[Any, int]:
    rows = engine.query(f"SELECT {view.entity}, count FROM merged.{view.name}", row_cap=10**6).table.to_pylist()
    return {r[view.entity]: r["count"] for r in rows}


def test_one_extreme_record_changes_no_other_entitys_window(setup: tuple[Lake, DuckEngine, list[Arrived]]) -> None:
    """A valid event dated 9999-12-31 (or a day ahead) moves its own user's window only."""
    written, engine, arrived = setup
    written.publish_run(arrived, positions(arrived, 0.5))
    written.score(between(arrived, positions(arrived, 0.5), positions(arrived, 1.0)))
    engine.refresh()
    before = {v.name: merged_windows(engine, v) for v in SPEC.views if v.windowed}
    assert all(before.values())
    last = arrived[-1]
    extreme = dict(last.event, event_id="far-future", user_id="u-far", event_time=253402300799000)
    written.score([Arrived(last.partition, last.offset + 1, extreme)])
    engine.refresh()
    for view in SPEC.views:
        if view.windowed:
            after = merged_windows(engine, view)
            assert after.pop("u-far") == 1
            assert after == before[view.name], view.name


def test_other_groups_and_windows(setup: tuple[Lake, DuckEngine, list[Arrived]]) -> None:
    written, engine, arrived = setup
    b = positions(arrived, 0.5)
    written.publish_run(arrived, b)
    written.score(arrived, group="another-group")  # not the group this engine merges
    written.score(between(arrived, b, positions(arrived, 1.0)))
    engine.refresh()
    everything = positions(arrived, 1.0)
    expected = recompute(arrived, everything)
    assert merged_states(engine) == expected

    # merged.user_10m: per user, the 10 one-minute buckets ending at that user's newest bucket
    view = SPEC.view("user_10m")
    assert merged_windows(engine, view) == windows(expected, view)
    rows = engine.query("SELECT user_id, count, window_end_ms, events_per_minute FROM merged.user_10m",
                        row_cap=10**6).table.to_pylist()
    ends = {user: max(b for (u, b) in expected["user_10m"] if u == user) for user, _ in expected["user_10m"]}
    assert {r["user_id"]: r["window_end_ms"] for r in rows} == ends
    assert len(set(ends.values())) > 1  # users' windows end at different times
    assert all(r["events_per_minute"] == pytest.approx(r["count"] / 10) for r in rows)

    # merged.user_all: derived mean and std from the exact states
    profile = {r["user_id"]: r for r in engine.query("SELECT * FROM merged.user_all", row_cap=10**6)
               .table.to_pylist()}
    for (user, _), state in expected["user_all"].items():
        n, total, squares = state["count"], state["amount_sum"], state["amount_sum_sq"]
        assert profile[user]["mean_amount"] == pytest.approx(total / n / 100)
        std = ((n * squares - total * total) ** 0.5) / n / 100 if n > 1 else 0.0
        assert profile[user]["std_amount"] == pytest.approx(std)


def test_entity_states_equal_a_recomputation(setup: tuple[Lake, DuckEngine, list[Arrived]]) -> None:
    """What /predict reads for an event: each view's states over its window, as recomputed."""
    written, engine, arrived = setup
    b = positions(arrived, 0.5)
    written.publish_run(arrived, b)
    written.score(between(arrived, b, positions(arrived, 1.0)))
    engine.refresh()
    tables = recompute(arrived, positions(arrived, 1.0))
    probe = dict(arrived[-1].event, event_time=arrived[-1].event["event_time"] + 1)
    found = engine.entity_states(probe)
    assert found.states == {v.name: window_states(v, tables[v.name], probe[v.entity], probe["event_time"])
                            for v in SPEC.views}
    assert found.unknown == [] and found.snapshot["batch_run_id"] == "run-1"
    stranger = dict(probe, user_id="nobody", merchant_id="nowhere")
    unknown = engine.entity_states(stranger)
    assert unknown.unknown == ["merchant_id", "user_id"]
    assert SPEC.features(unknown.states, stranger)[1:5] == [0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("query", [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM glob('/*')",
    "SELECT * FROM read_parquet('http://127.0.0.1:1/x.parquet')",
    "SELECT * FROM '/etc/passwd'",
    "COPY (SELECT 1) TO '/tmp/lambdalake-escape.csv'",
    "ATTACH '/tmp/lambdalake-escape.db' AS x",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "PRAGMA enable_external_access",
    "CREATE TABLE gold.x AS SELECT 1",
    "DROP VIEW merged.user_all",
    "DELETE FROM speed.increments",
    "INSERT INTO batch.boundary VALUES (0, 1)",
    "EXPORT DATABASE '/tmp/lambdalake-escape'",
    "SELECT 1; DROP VIEW merged.user_all",
    "",
])
def test_sql_escapes_are_refused(setup: tuple[Lake, DuckEngine, list[Arrived]], query: str) -> None:
    _, engine, _ = setup
    engine.refresh()
    with pytest.raises(SqlError):
        engine.query(query)
    assert engine.query("SELECT count(*) AS n FROM merged.user_all").table.to_pylist() == [{"n": 0}]
    assert not Path("/tmp/lambdalake-escape.csv").exists()


def test_row_cap_and_timeout(setup: tuple[Lake, DuckEngine, list[Arrived]]) -> None:
    _, engine, _ = setup
    engine.refresh()
    capped = engine.query("SELECT * FROM range(100)", row_cap=10)
    assert capped.table.num_rows == 10 and capped.truncated
    assert not engine.query("SELECT * FROM range(10)", row_cap=10).truncated
    with pytest.raises(SqlTimeout):
        engine.query("SELECT count(*) FROM range(100000000) a, range(100000000) b", timeout_s=0.5)
    assert engine.query("SELECT 1 AS one").table.to_pylist() == [{"one": 1}]
