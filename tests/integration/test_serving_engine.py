"""The embedded SQL engine over a published batch run (Delta, delta-rs, in a temporary
directory) and the online store (a real redis-server of its own, on a free loopback port):
merged views equal a plain recomputation over the events they cover at every moment (before
the speed layer stepped, between its steps, between a run's cut and its publication, after
runs with partitions at different positions); point reads equal the same recomputation and
say what they reflect; a refresh skips work when nothing moved and costs the store's states,
not its steps; SQL is read-only and bounded."""

from __future__ import annotations

import dataclasses
import uuid
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from lakehouse.errors import SqlError, SqlTimeout
from lakehouse.fraud import FRAUD_SPEC
from lakehouse.generator import GeneratorOptions, generate
from lakehouse.online.base import NOTHING, Cut, Step, increments_of
from lakehouse.online.redis_store import RedisOnlineStore
from lakehouse.tables import BUCKET, BatchRun, Lakehouse, publish_run
from serving.duck import DuckEngine, entity_types, gold_schema
from serving.live import LiveSource, live_tables
from serving.point import exact_int
from tests.oracle import states_by_view, window_states

pytestmark = pytest.mark.integration

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


def live_states(arrived: list[Arrived], low: dict[int, int], high: dict[int, int]) -> int:
    """How many (view, entity, bucket) states the events above `low` through `high` make."""
    tables = states_by_view(SPEC.views, [a.event for a in between(arrived, low, high)], SPEC.events.time_field)
    return sum(len(table) for table in tables.values())


def merged_states(engine: DuckEngine) -> dict[str, dict[tuple[Any, int], dict[str, int]]]:
    out = {}
    for view in SPEC.views:
        rows = engine.query(f"SELECT * FROM merged.{view.name}_states", row_cap=10**6).table.to_pylist()
        out[view.name] = {(r[view.entity], r[BUCKET]): {n: int(r[n]) for n in view.aggregations} for r in rows}
    return out


def step_above(batch: list[Arrived]) -> Callable[[int], Step]:
    """What the speed layer's step of one partition's micro-batch adds: the increments of
    its events above the store's applied offset."""
    def above(applied: int) -> Step:
        return Step(increments_of(SPEC, [a.event for a in batch if a.offset > applied]), {}, {})

    return above


class Layers:
    """What the batch and speed layers would do: the speed layer's steps into the online
    store (one per partition of a micro-batch), and the views job's runs, each cutting the
    store and taking the cuts as its boundary, with gold views of the oracle's states (never
    the fold under test) in Delta."""

    def __init__(self, root: Path, url: str) -> None:
        self.lakehouse = Lakehouse(str(root))
        self.url = url
        self.prefix = f"t-{uuid.uuid4().hex}"  # a store of its own: no wipe needed
        self.store = self.store_of(GROUP)
        self.runs = 0

    def store_of(self, group: str) -> RedisOnlineStore:
        return RedisOnlineStore(SPEC, group, self.url, prefix=self.prefix)

    def engine(self) -> DuckEngine:
        """Serving, with a connection to the store of its own (as another process has)."""
        return DuckEngine(SPEC, self.lakehouse, store=self.store_of(GROUP), partitions=PARTITIONS)

    def score(self, arrived: list[Arrived], *, group: str = GROUP) -> dict[int, bool]:
        """The speed layer's micro-batch: per partition, one step of the records it consumed
        (contiguous offsets from its position); whether each step changed the store."""
        store = self.store if group == GROUP else self.store_of(group)
        batches: dict[int, list[Arrived]] = defaultdict(list)
        for a in sorted(arrived, key=lambda a: (a.partition, a.offset)):
            batches[a.partition].append(a)
        return {p: store.apply(p, batch[0].offset, batch[-1].offset, step_above(batch))
                for p, batch in batches.items()}

    def cut(self, floors: dict[int, int]) -> dict[int, Cut]:
        """A run's cut of every partition: at the applied offset where the speed layer
        stepped, else at the floor (the offsets the run validated)."""
        return {p: self.store.cut(p, floor=floors.get(p, NOTHING)) for p in range(PARTITIONS)}

    def publish(self, arrived: list[Arrived], cuts: dict[int, Cut]) -> BatchRun:
        """Publish a run of the events at or below the cuts."""
        from deltalake import DeltaTable, write_deltalake

        self.runs += 1
        run_id = f"run-{self.runs}"
        boundary = {p: c.offset for p, c in cuts.items()}
        versions = {}
        tables = recompute(arrived, boundary)
        for view in SPEC.views:
            rows = [{view.entity: entity, BUCKET: bucket, **state, "batch_run_id": run_id}
                    for (entity, bucket), state in tables[view.name].items()]
            write_deltalake(self.lakehouse.gold(view.name),
                            pa.Table.from_pylist(rows, schema=gold_schema(SPEC, view)), mode="overwrite")
            versions[view.name] = DeltaTable(self.lakehouse.gold(view.name)).version()
        return publish_run(self.lakehouse, BatchRun(
            run_id=run_id, boundary=boundary, cut_epochs={p: c.epoch for p, c in cuts.items()},
            view_versions=versions, source_versions={}, row_counts={}, durations_s={},
            spec_fingerprint=SPEC.fingerprint(), finished_at=datetime(2026, 1, 1, 0, self.runs, tzinfo=UTC)))

    def publish_run(self, arrived: list[Arrived], floors: dict[int, int] | None = None) -> BatchRun:
        """What the views job does: cut the store, then publish at the cuts."""
        return self.publish(arrived, self.cut(floors or {}))


def upto(arrived: list[Arrived], limits: dict[int, int]) -> list[Arrived]:
    return [a for a in arrived if a.offset <= limits.get(a.partition, -1)]


def between(arrived: list[Arrived], low: dict[int, int], high: dict[int, int]) -> list[Arrived]:
    return [a for a in arrived if low.get(a.partition, -1) < a.offset <= high.get(a.partition, -1)]


def every(limits: dict[int, int]) -> dict[int, int]:
    """`limits` over every partition (-1: none)."""
    return {p: limits.get(p, -1) for p in range(PARTITIONS)}


def as_json(offsets: dict[int, int]) -> dict[str, int]:
    return {str(p): o for p, o in sorted(offsets.items())}


@pytest.fixture()
def setup(tmp_path: Path, redis_url: str) -> Iterator[tuple[Layers, DuckEngine, list[Arrived]]]:
    written = Layers(tmp_path / "delta", redis_url)
    engine = written.engine()
    yield written, engine, stream()
    engine.close()


def positions(arrived: list[Arrived], share: float) -> dict[int, int]:
    ends: dict[int, int] = defaultdict(lambda: -1)
    for a in arrived:
        ends[a.partition] = max(ends[a.partition], a.offset)
    return {p: int(e * share) for p, e in ends.items()}


def test_merged_views_are_exact_at_every_moment(setup: tuple[Layers, DuckEngine, list[Arrived]]) -> None:
    written, engine, arrived = setup
    assert engine.refresh().run_id is None  # nothing yet: empty views, no error
    assert merged_states(engine) == recompute(arrived, {})

    # a run before the speed layer ever stepped: the cuts are at the floors it validated
    b1 = positions(arrived, 0.4)
    assert written.publish_run(arrived, b1).boundary == every(b1)
    # the speed layer, resuming from behind that boundary, adds nothing the run covers
    assert written.score(upto(arrived, positions(arrived, 0.2))) == {p: False for p in range(PARTITIONS)}
    snapshot = engine.refresh()
    assert snapshot.run_id == "run-1" and snapshot.coverage == every(b1) and snapshot.increments == 0
    assert merged_states(engine) == recompute(arrived, b1)

    # the speed layer past the boundary, in three micro-batches with refreshes between
    previous = positions(arrived, 0.2)
    for share in (0.5, 0.6, 0.75):
        now = positions(arrived, share)
        assert all(written.score(between(arrived, previous, now)).values())
        previous = now
        snapshot = engine.refresh()
        assert snapshot.coverage == every(now)
        assert snapshot.increments == live_states(arrived, b1, now)
        assert merged_states(engine) == recompute(arrived, now)

    # a new run at the speed layer's position (a floor is ignored where the speed layer
    # stepped: no run passes it); between its cut and its publication the views still read
    # the first run ⊕ every epoch after its cut
    cuts = written.cut(positions(arrived, 0.9))
    assert {p: c.offset for p, c in cuts.items()} == every(previous)
    assert engine.refresh().run_id == "run-1"
    assert merged_states(engine) == recompute(arrived, previous)
    b2 = every(previous)
    written.publish(arrived, cuts)
    snapshot = engine.refresh()
    assert snapshot.run_id == "run-2" and snapshot.boundary == b2 and snapshot.coverage == b2
    assert snapshot.increments == 0
    assert merged_states(engine) == recompute(arrived, b2)

    # steps above the second run's cut
    for share in (0.8, 0.9):
        now = positions(arrived, share)
        written.score(between(arrived, previous, now))
        previous = now
        snapshot = engine.refresh()
        assert snapshot.coverage == every(now) and snapshot.increments == live_states(arrived, b2, now)
        assert merged_states(engine) == recompute(arrived, now)

    # partitions at different positions: 0 and 1 run on to the end, 2 and 3 stay behind
    ends = positions(arrived, 1.0)
    ahead = {p: ends[p] if p < 2 else o for p, o in previous.items()}
    written.score(between(arrived, previous, ahead))
    assert engine.refresh().coverage == every(ahead)
    assert merged_states(engine) == recompute(arrived, ahead)
    assert written.publish_run(arrived).boundary == every(ahead)
    snapshot = engine.refresh()
    assert snapshot.run_id == "run-3" and snapshot.boundary == every(ahead) and snapshot.increments == 0
    assert merged_states(engine) == recompute(arrived, ahead)
    written.score(between(arrived, ahead, ends))  # 2 and 3 catch up
    snapshot = engine.refresh()
    assert snapshot.coverage == every(ends) and snapshot.increments == live_states(arrived, ahead, ends)
    assert merged_states(engine) == recompute(arrived, ends)


def test_a_run_before_the_speed_layer_stepped_some_partitions(
        setup: tuple[Layers, DuckEngine, list[Arrived]]) -> None:
    """Stepped partitions are cut at the speed layer's position, the others at the run's
    floors; the speed layer then consumes those from its own position, skipping the run's."""
    written, engine, arrived = setup
    stepped = {p: o for p, o in positions(arrived, 0.3).items() if p < 2}
    written.score(upto(arrived, stepped))
    snapshot = engine.refresh()  # no run yet: the views are the store's states alone
    assert snapshot.run_id is None and snapshot.coverage == every(stepped)
    assert merged_states(engine) == recompute(arrived, stepped)

    floors = positions(arrived, 0.5)
    boundary = {**floors, **stepped}
    assert written.publish_run(arrived, floors).boundary == every(boundary)
    snapshot = engine.refresh()
    assert snapshot.coverage == every(boundary) and snapshot.increments == 0
    assert merged_states(engine) == recompute(arrived, boundary)

    ends = positions(arrived, 1.0)
    assert all(written.score(between(arrived, stepped, ends)).values())  # 2 and 3 from offset 0
    snapshot = engine.refresh()
    assert snapshot.coverage == every(ends) and snapshot.increments == live_states(arrived, boundary, ends)
    assert merged_states(engine) == recompute(arrived, ends)


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


def test_one_extreme_record_changes_no_other_entitys_window(
        setup: tuple[Layers, DuckEngine, list[Arrived]]) -> None:
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


def test_other_groups_and_windows(setup: tuple[Layers, DuckEngine, list[Arrived]]) -> None:
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


def test_entity_states_equal_a_recomputation(setup: tuple[Layers, DuckEngine, list[Arrived]]) -> None:
    """What /predict reads for an event: each view's states over its window, as recomputed,
    read at the request (as fresh as the speed layer's last step, refreshed or not)."""
    written, engine, arrived = setup
    b = positions(arrived, 0.5)
    written.publish_run(arrived, b)
    written.score(between(arrived, b, positions(arrived, 0.7)))
    engine.refresh()
    ends = positions(arrived, 1.0)
    written.score(between(arrived, positions(arrived, 0.7), ends))  # no refresh since
    assert engine.snapshot.coverage == every(positions(arrived, 0.7))
    tables = recompute(arrived, ends)
    probe = dict(arrived[-1].event, event_time=arrived[-1].event["event_time"] + 1)
    found = engine.entity_states(probe)
    assert found.states == {v.name: window_states(v, tables[v.name], probe[v.entity], probe["event_time"])
                            for v in SPEC.views}
    assert found.unknown == []
    assert found.snapshot == {"batch_run_id": "run-1", "boundary": as_json(every(b)), "coverage": as_json(every(ends))}
    for a in arrived[::37]:  # more entities, at their own times
        event = dict(a.event, event_time=a.event["event_time"] + 1)
        assert engine.entity_states(event).states == {
            v.name: window_states(v, tables[v.name], event[v.entity], event["event_time"]) for v in SPEC.views}
    stranger = dict(probe, user_id="nobody", merchant_id="nowhere")
    unknown = engine.entity_states(stranger)
    assert unknown.unknown == ["merchant_id", "user_id"]
    assert SPEC.features(unknown.states, stranger)[1:5] == [0.0, 0.0, 0.0, 0.0]


def sql_rows(engine: DuckEngine, entity_field: str, entity: Any) -> dict[str, dict[str, Any]]:
    """Per view over `entity_field`: its merged.<view> row of `entity` by SQL, without the
    entity column ({}: none)."""
    out = {}
    for view in SPEC.views:
        if view.entity != entity_field:
            continue
        literal = "'" + str(entity).replace("'", "''") + "'"
        rows = engine.query(f"SELECT * FROM merged.{view.name} WHERE {view.entity} = {literal}").table.to_pylist()
        assert len(rows) <= 1
        out[view.name] = {} if not rows else {n: int(v) if n in view.aggregations and v is not None else v
                                              for n, v in rows[0].items() if n != view.entity}
    return out


def test_entity_features_equal_the_merged_views(setup: tuple[Layers, DuckEngine, list[Arrived]]) -> None:
    """/v1/entities: one entity's merged.<view> rows, read from gold and the store at the
    request, equal the SQL views' rows (refreshed with nothing moved since)."""
    written, engine, arrived = setup
    b = positions(arrived, 0.4)
    written.publish_run(arrived, b)
    ends = positions(arrived, 0.9)
    written.score(between(arrived, b, ends))
    snapshot = engine.refresh()
    users = sorted({a.event["user_id"] for a in arrived})
    merchants = sorted({a.event["merchant_id"] for a in arrived})
    late = {a.event["user_id"] for a in between(arrived, ends, positions(arrived, 1.0))}
    checked = 0
    for field, entities in (("user_id", users[::7]), ("merchant_id", merchants[::3])):
        for entity in entities:
            features = engine.entity_features(field, entity)
            assert features.views == sql_rows(engine, field, entity), (field, entity)
            assert features.snapshot == {"batch_run_id": "run-1", "boundary": as_json(every(b)),
                                         "coverage": as_json(every(ends)), "speed_increments": snapshot.increments}
            checked += sum(1 for row in features.views.values() if row)
    assert checked > 20
    assert engine.entity_features("user_id", "nobody").views == {"user_10m": {}, "user_24h": {}, "user_all": {}}
    # after more steps and a refresh, they agree again (and before it, entity_features is ahead)
    written.score(between(arrived, ends, positions(arrived, 1.0)))
    assert engine.entity_features("user_id", sorted(late)[0]).snapshot["coverage"] == \
        as_json(every(positions(arrived, 1.0)))
    engine.refresh()
    for user in sorted(late):
        assert engine.entity_features("user_id", user).views == sql_rows(engine, "user_id", user)


def test_a_refresh_with_nothing_moved_does_no_work(setup: tuple[Layers, DuckEngine, list[Arrived]]) -> None:
    written, engine, arrived = setup
    written.publish_run(arrived, positions(arrived, 0.5))
    written.score(between(arrived, positions(arrived, 0.5), positions(arrived, 0.7)))
    first = engine.refresh()
    assert engine.refresh() is first
    cuts = written.cut({})  # a run's cut, not published yet: nothing the views show moved
    assert engine.refresh() is first
    written.score(between(arrived, positions(arrived, 0.7), positions(arrived, 0.8)))  # into the new epoch
    second = engine.refresh()
    assert second is not first and second.coverage == every(positions(arrived, 0.8))
    assert second.run_id == "run-1" and merged_states(engine) == recompute(arrived, positions(arrived, 0.8))
    assert engine.refresh() is second
    written.publish(arrived, cuts)
    third = engine.refresh()
    assert third.run_id == "run-2" and third.boundary == every(positions(arrived, 0.7))
    assert third.increments == live_states(arrived, positions(arrived, 0.7), positions(arrived, 0.8))
    assert merged_states(engine) == recompute(arrived, positions(arrived, 0.8))
    assert engine.refresh() is third


def test_a_refresh_costs_the_stores_states_not_its_steps(tmp_path: Path, redis_url: str) -> None:
    """The store keeps states, not events: the same events in 10 or in 200 steps per
    partition leave the live tables a refresh loads with the same states."""
    arrived = stream(events=2000, seed=7)
    floors, ends = positions(arrived, 0.1), positions(arrived, 1.0)
    loaded = {}
    for steps in (10, 200):
        written = Layers(tmp_path / f"delta-{steps}", redis_url)
        written.publish_run(arrived, floors)
        applied = 0
        for p in range(PARTITIONS):
            mine = [a for a in between(arrived, floors, ends) if a.partition == p]
            assert len(mine) >= steps
            for i in range(steps):
                batch = mine[len(mine) * i // steps:len(mine) * (i + 1) // steps]
                applied += written.score(batch)[p]
        assert applied == steps * PARTITIONS
        engine = written.engine()
        try:
            snapshot = engine.refresh()
            assert snapshot.coverage == every(ends)
            assert merged_states(engine) == recompute(arrived, ends)
            loaded[steps] = (snapshot.increments, {
                view.name: engine.query(f"SELECT count(*) AS n FROM speed.{view.name}_states").table.to_pylist()[0]["n"]
                for view in SPEC.views})
        finally:
            engine.close()
    assert loaded[10] == loaded[200]
    assert loaded[10][0] == live_states(arrived, floors, ends) == sum(loaded[10][1].values())


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
    "DELETE FROM speed.user_all_states",
    "INSERT INTO batch.boundary VALUES (0, 1)",
    "EXPORT DATABASE '/tmp/lambdalake-escape'",
    "SELECT 1; DROP VIEW merged.user_all",
    "",
])
def test_sql_escapes_are_refused(setup: tuple[Layers, DuckEngine, list[Arrived]], query: str) -> None:
    _, engine, _ = setup
    engine.refresh()
    with pytest.raises(SqlError):
        engine.query(query)
    assert engine.query("SELECT count(*) AS n FROM merged.user_all").table.to_pylist() == [{"n": 0}]
    assert not Path("/tmp/lambdalake-escape.csv").exists()


def test_row_cap_and_timeout(setup: tuple[Layers, DuckEngine, list[Arrived]]) -> None:
    _, engine, _ = setup
    engine.refresh()
    capped = engine.query("SELECT * FROM range(100)", row_cap=10)
    assert capped.table.num_rows == 10 and capped.truncated
    assert not engine.query("SELECT * FROM range(10)", row_cap=10).truncated
    with pytest.raises(SqlTimeout):
        engine.query("SELECT count(*) FROM range(100000000) a, range(100000000) b", timeout_s=0.5)
    assert engine.query("SELECT 1 AS one").table.to_pylist() == [{"one": 1}]


def speed_rows(engine: DuckEngine) -> dict[str, dict[tuple[Any, int], list[Any]]]:
    """speed.<view>_states as the engine holds them, per view: (entity, bucket) → states."""
    out = {}
    for view in SPEC.views:
        rows = engine.query(f"SELECT * FROM speed.{view.name}_states", row_cap=10**6).table.to_pylist()
        keyed = {(r[view.entity], r[BUCKET]): [exact_int(r[n]) for n in view.aggregations] for r in rows}
        assert len(keyed) == len(rows), "one row per (entity, bucket)"
        out[view.name] = keyed
    return out


def reloaded_rows(written: Layers, cut_epochs: dict[int, int]) -> tuple[dict[str, dict[tuple[Any, int], list[Any]]],
                                                                     dict[int, int]]:
    """What a full reload (`live_tables`) reads from the store now, in the same form."""
    full = live_tables(LiveSource(written.store, PARTITIONS, cut_epochs), SPEC, entity_types(SPEC))
    out = {}
    for view in SPEC.views:
        out[view.name] = {(r[view.entity], r[BUCKET]): [exact_int(r[n]) for n in view.aggregations]
                          for r in full.tables[view.name].to_pylist()}
    return out, full.coverage


def gold_plus(gold: dict[str, dict[tuple[Any, int], dict[str, int]]],
              live: dict[str, dict[tuple[Any, int], list[Any]]]) -> dict[str, dict[tuple[Any, int], dict[str, int]]]:
    """The oracle's gold states ⊕ live rows, per view, with the views' monoids."""
    out = {}
    for view in SPEC.views:
        states = {key: dict(values) for key, values in gold[view.name].items()}
        for key, values in live[view.name].items():
            current = states.setdefault(key, {})
            for (name, aggregation), value in zip(view.aggregations.items(), values, strict=True):
                current[name] = value if name not in current else aggregation.plus(current[name], value)
        out[view.name] = states
    return out


_STREAM: list[Arrived] = []

operations = st.one_of(
    st.tuples(st.just("step"), st.integers(0, PARTITIONS - 1), st.integers(1, 30), st.integers(0, 5)),
    st.tuples(st.just("refresh")),
    st.tuples(st.just("cut"), st.integers(-1, 40)),
    st.tuples(st.just("publish")),
)


@hypothesis_settings(max_examples=12, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(program=st.lists(operations, min_size=3, max_size=45))
@example(program=[("step", 0, 30, 0), ("step", 1, 20, 0), ("refresh",), ("step", 0, 25, 5), ("step", 2, 10, 0),
                  ("refresh",), ("cut", 30), ("step", 1, 30, 0), ("refresh",), ("publish",), ("refresh",),
                  ("step", 3, 30, 0), ("step", 0, 30, 0), ("refresh",), ("step", 3, 5, 2), ("publish",),
                  ("step", 1, 20, 0), ("refresh",), ("step", 2, 30, 0), ("step", 0, 3, 0), ("refresh",)])
def test_an_incremental_refresh_equals_a_full_reload(redis_url: str, program: list[tuple[Any, ...]]) -> None:
    """Random micro-batches over four partitions (some replayed in part), refreshes, cuts
    (with floors where a partition was never stepped), publications and the epoch drops that
    follow them, in any order: after every refresh, the speed tables one long-lived engine
    keeps up to date from the store's changes equal a full reload of the store's live states,
    its merged views equal the oracle as of its coverage vector, and at the end they equal
    those of a new engine (which loads everything)."""
    import tempfile

    if not _STREAM:
        _STREAM.extend(stream(events=1200, seed=11))
    arrived = _STREAM
    mine: dict[int, list[Arrived]] = defaultdict(list)
    for a in arrived:
        mine[a.partition].append(a)
    with tempfile.TemporaryDirectory() as root:
        written = Layers(Path(root), redis_url)
        engine = written.engine()
        position = dict.fromkeys(range(PARTITIONS), 0)  # the next offset each member consumes
        pending: dict[int, Cut] | None = None  # a run's cut, not published yet
        published: list[BatchRun] = []
        try:
            for operation in [*program, ("refresh",)]:
                kind = operation[0]
                if kind == "step":
                    _, p, count, replayed = operation
                    start = max(0, position[p] - replayed)  # a member resuming behind the store
                    batch = mine[p][start:position[p] + count]
                    if batch:
                        written.score(batch)
                        position[p] = max(position[p], batch[-1].offset + 1)
                elif kind == "cut" and pending is None:
                    pending = written.cut(dict.fromkeys(range(PARTITIONS), operation[1]))
                    # a floor above what the speed layer applied: until the run is published,
                    # readers of the previous one see such a partition up to the jump only
                    position = {p: max(o, pending[p].offset + 1) for p, o in position.items()}
                elif kind == "publish":
                    cuts = pending if pending is not None else written.cut({})
                    pending = None
                    run = written.publish(arrived, cuts)
                    if published:  # as the views job does: the epochs only the previous run's readers read
                        for p, epoch in published[-1].cut_epochs.items():
                            written.store.drop_epochs(p, min(epoch, run.cut_epochs[p]))
                    published.append(run)
                elif kind == "refresh":
                    before = (engine.snapshot.run_id, engine._mirror)
                    snapshot = engine.refresh()
                    if before[1] is not None and snapshot.run_id == before[0]:
                        assert engine._mirror is before[1], "the same run: caught up, not reloaded"
                    cut_epochs = published[-1].cut_epochs if published else {}
                    assert snapshot.run_id == (published[-1].run_id if published else None)
                    reloaded, coverage = reloaded_rows(written, cut_epochs)
                    assert snapshot.coverage == {**snapshot.boundary, **coverage}
                    assert speed_rows(engine) == reloaded
                    assert snapshot.increments == sum(len(rows) for rows in reloaded.values())
                    merged = merged_states(engine)
                    assert merged == gold_plus(recompute(arrived, snapshot.boundary), reloaded)
                    assert merged == recompute(arrived, snapshot.coverage)  # a floored cut too
            fresh = written.engine()
            try:
                assert fresh.refresh().coverage == engine.snapshot.coverage
                assert speed_rows(fresh) == speed_rows(engine)
                assert merged_states(fresh) == merged_states(engine)
            finally:
                fresh.close()
        finally:
            engine.close()


def test_a_refresh_after_the_store_was_wiped_and_rebuilt(setup: tuple[Layers, DuckEngine, list[Arrived]]) -> None:
    """`lambdalake speed rebuild`: the store wiped (its applied offsets go back: the engine
    loads everything again, which is nothing) and restored from the lakehouse (the restored pairs are
    changes at the restored offset); the views are exact at each refresh."""
    written, engine, arrived = setup
    b = positions(arrived, 0.4)
    run = written.publish_run(arrived, b)
    ends = positions(arrived, 0.8)
    written.score(between(arrived, b, ends))
    assert engine.refresh().coverage == every(ends)
    written.store.wipe()
    assert engine.refresh().increments == 0  # the run alone: nothing above its boundary
    assert merged_states(engine) == recompute(arrived, b)
    restored = positions(arrived, 0.6)  # what Delta recorded as scored: less than the store held
    for p in range(PARTITIONS):
        events = [a.event for a in between(arrived, b, restored) if a.partition == p]
        written.store.restore(p, epoch=run.cut_epochs[p] + 1, applied=restored[p],
                              increments=increments_of(SPEC, events), seen={})
    snapshot = engine.refresh()
    assert snapshot.coverage == every(restored)
    assert merged_states(engine) == recompute(arrived, restored)
    assert speed_rows(engine) == reloaded_rows(written, run.cut_epochs)[0]
    written.score(between(arrived, restored, positions(arrived, 1.0)))
    assert engine.refresh().coverage == every(positions(arrived, 1.0))
    assert merged_states(engine) == recompute(arrived, positions(arrived, 1.0))
