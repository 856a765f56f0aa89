"""The exact merge (issue 13) against the real platform: Kafka, the speed layer on Ray Serve,
the platform's redis-server as the online store, Spark + Delta, and the HTTP API. Every
answer is compared with the plain oracle (tests/oracle.py) recomputed from the Kafka topic
itself, as of the coverage vector the answer reports:

- the platform's redis-server stopped cleanly, and SIGKILLed after its AOF was fsynced, then
  started again: the store's applied offsets, epochs, live states, seen sets and outbox are
  what they were; the running speed layer resumes; SQL and /v1/entities equal the oracle and
  scored_events holds each event once;
- /v1/predict and /v1/entities while a batch run cuts the store and publishes mid-stream:
  every answer 2xx, its features those of the oracle as of the vector it reports;
- SQL and /v1/entities while the maintenance job compacts speed/scored_events under the
  speed layer's appends, and scored_events holding each event once afterwards;
- partitions at different positions (hypothesis: events per partition, how far the speed
  layer consumed): SQL and /v1/entities over HTTP equal the oracle as of the vector.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpx
import pytest
from hypothesis import HealthCheck, Phase, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import SecretStr

from batch import jobs
from infra.process import port_open
from infra.redis import RedisService
from lakehouse.config import Settings
from lakehouse.online import open_store
from lakehouse.online.base import OnlineStore
from lakehouse.online.redis_store import RedisOnlineStore
from lakehouse.tables import BUCKET
from tests.conftest import lambdalake
from tests.integration.streams import (
    LiveLayer,
    Located,
    Stream,
    arrivals,
    as_coverage,
    caught_up,
    last_offsets,
    new_stream,
    oracle_features,
    oracle_row,
    oracle_states,
    scored,
    send,
    serve_champion,
    wait_for,
)
from tests.integration.test_serving import ADMIN, Api, start_api
from tests.oracle import empty_states

pytestmark = pytest.mark.integration

_T = TypeVar("_T")


@pytest.fixture(scope="module")
def served(ray_cluster: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A champion model on the platform's Ray Serve, as app `model`."""
    yield from serve_champion(ray_cluster, tmp_path_factory.mktemp("bundles"))


def quiet(line: str) -> None:
    """An echo that keeps the jobs' progress out of the test output."""


def platform_settings(stream: Stream, group: str) -> Settings:
    """The settings the API and the batch jobs of one stream run with: its lakehouse, its
    speed group, a key of every scope, refreshes twice a second, no row cap in the way."""
    return stream.settings.model_copy(update={
        "speed_group": group, "delta_root": stream.lakehouse.root,
        "api_keys": SecretStr(f"admin:{ADMIN}:predict+features+sql"),
        "serving_refresh_s": 0.5, "sql_row_cap": 1_000_000})


@contextlib.contextmanager
def running_api(settings: Settings, stream: Stream) -> Iterator[Api]:
    """The HTTP API (uvicorn, in a thread) over the stream's lakehouse and speed group."""
    running = start_api(settings, stream)
    api = next(running)
    try:
        yield api
    finally:
        next(running, None)


def wait_caught_up(layer: LiveLayer, store: OnlineStore, ends: dict[int, int], timeout: float = 180) -> None:
    """Until the live member applied every partition through `ends` and flushed its outbox;
    fails at once with its error if it stopped, or with where the store stands."""
    def done() -> bool:
        layer.check()
        return caught_up(store, ends)

    try:
        wait_for(done, timeout=timeout, every_s=0.5)
    except AssertionError as timed_out:
        if str(timed_out) != "timed out":
            raise
        raise AssertionError(f"the speed layer did not catch up within {timeout:.0f}s: the store applied "
                             f"{store.applied(sorted(ends))}, Kafka holds {ends}") from None


def store_of(stream: Stream, group: str) -> RedisOnlineStore:
    """The online store of a speed group over the stream's lakehouse (what the API opens)."""
    store = open_store(stream.settings, stream.spec, group=group, root=stream.lakehouse.root)
    assert isinstance(store, RedisOnlineStore)
    return store


# --------------------------------------------------------------------- what answers must equal
def sql_states(client: httpx.Client, view: Any) -> tuple[dict[int, int], str | None, dict[Any, dict[str, Any]]]:
    """merged.<view>_states over HTTP, with the coverage and run of the very snapshot the
    query read (serving.snapshot, joined in the same query: a refresh in between cannot
    split them)."""
    answer = client.post("/v1/sql", json={"query": (
        "SELECT snap.coverage AS snapshot_coverage, snap.batch_run_id AS snapshot_run, s.* "
        f"FROM serving.snapshot AS snap LEFT JOIN merged.{view.name}_states AS s ON true")})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["truncated"] is False
    rows = body["rows"]
    assert rows, "serving.snapshot has no row"
    coverage = as_coverage(json.loads(rows[0]["snapshot_coverage"]))
    assert all(json.loads(r["snapshot_coverage"]) == json.loads(rows[0]["snapshot_coverage"]) for r in rows)
    states = {(r[view.entity], r[BUCKET]): {n: r[n] for n in view.aggregations}
              for r in rows if r[view.entity] is not None}
    assert len(states) == sum(1 for r in rows if r[view.entity] is not None)  # one row per key
    return coverage, rows[0]["snapshot_run"], states


def by_coverage(spec: Any, arrived: list[Located], items: list[_T],
                coverage_of: Callable[[_T], dict[int, int]]) -> Iterator[tuple[dict[str, Any], list[_T]]]:
    """`items` grouped by their coverage vector, each group with the oracle's states as of
    it (computed once per vector, one vector at a time)."""
    groups: dict[tuple[tuple[int, int], ...], list[_T]] = {}
    for item in items:
        groups.setdefault(tuple(sorted(coverage_of(item).items())), []).append(item)
    for key, group in groups.items():
        yield oracle_states(spec, arrived, dict(key)), group


def own_states(tables: dict[str, Any]) -> dict[str, dict[Any, dict[tuple[Any, int], Any]]]:
    """Per view and entity, the part of the oracle's table that is the entity's (so that a
    window is summed over the entity's buckets, not over a scan of everyone's)."""
    out: dict[str, dict[Any, dict[tuple[Any, int], Any]]] = {}
    for name, table in tables.items():
        mine = out[name] = {}
        for (entity, bucket), states in table.items():
            mine.setdefault(entity, {})[(entity, bucket)] = states
    return out


def assert_sql_equals_the_oracle(spec: Any, arrived: list[Located], taken: list[tuple[Any, ...]]) -> None:
    """Each (view, coverage, states) taken by `sql_states` equals the oracle at its coverage."""
    for tables, group in by_coverage(spec, arrived, taken, lambda item: item[1]):
        for view, coverage, states in group:
            assert states == tables[view.name], f"merged.{view.name}_states differs from the oracle at {coverage}"


def entity_answer(client: httpx.Client, entity: str, entity_id: Any) -> dict[str, Any]:
    answer = client.get(f"/v1/entities/{entity}/{entity_id}/features")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def assert_entity_equals_the_oracle(spec: Any, own: dict[str, Any], body: dict[str, Any]) -> None:
    """One /v1/entities answer equals the oracle's merged.<view> rows of its entity (states
    exactly, the derived features to the last bits a DOUBLE division may differ in); `own`:
    the oracle's states at the answer's coverage, by entity (`own_states`)."""
    entity_field, entity = body["entity"], body["id"]
    for view in spec.views:
        if view.entity != entity_field:
            continue
        got = body["views"][view.name]
        table = own[view.name].get(entity, {})
        expected = oracle_row(view, table, entity)
        where = f"{view.name} of {entity_field} {entity} at {body['coverage']}"
        if expected is None:
            assert got == empty_states(view), where
            assert view.name in body["defaults"], where
            continue
        assert {n: got[n] for n in view.aggregations} == expected, where
        count = expected["count"]
        if "amount_sum" in expected:
            assert got["mean_amount"] == pytest.approx(expected["amount_sum"] / count / 100, rel=1e-12), where
        if "amount_sum_sq" in expected:
            spread = count * expected["amount_sum_sq"] - expected["amount_sum"] ** 2
            std = max(spread, 0) ** 0.5 / count / 100 if count > 1 else 0.0
            assert got["std_amount"] == pytest.approx(std, rel=1e-9, abs=1e-9), where
        if view.bucket_ms and view.window_buckets:
            newest = max(b for (e, b) in table)
            assert got["window_end_ms"] == newest, where
            minutes = view.bucket_ms * view.window_buckets / 60_000
            assert got["events_per_minute"] == pytest.approx(count / minutes), where
    assert body["known"] is any(entity in own[v.name] for v in spec.views if v.entity == entity_field)


def assert_entities_equal_the_oracle(spec: Any, arrived: list[Located], bodies: list[dict[str, Any]]) -> None:
    """Each /v1/entities answer equals the oracle as of the coverage vector it reports."""
    for tables, group in by_coverage(spec, arrived, bodies, lambda body: as_coverage(body["coverage"])):
        own = own_states(tables)
        for body in group:
            assert_entity_equals_the_oracle(spec, own, body)


def sample_entities(arrived: list[Located], every: int = 23) -> list[tuple[str, Any]]:
    """Some users and merchants of the events, and an entity no event has."""
    users = sorted({e["user_id"] for _, _, e in arrived})
    merchants = sorted({e["merchant_id"] for _, _, e in arrived})
    return [*(("user_id", u) for u in users[::every]), *(("merchant_id", m) for m in merchants[::3]),
            ("user_id", "nobody-known")]


def assert_scored_once(stream: Stream, expected_ids: set[str]) -> list[dict[str, Any]]:
    """speed/scored_events holds each expected event exactly once, and nothing else."""
    rows = scored(stream)
    ids = Counter(r["event_id"] for r in rows)
    assert not [i for i, n in ids.items() if n > 1], "scored twice"
    assert set(ids) == expected_ids
    assert len({(r["partition"], r["offset"]) for r in rows}) == len(rows)
    return rows


# --------------------------------------------------------------------- 1. a redis-server restart
def store_contents(store: RedisOnlineStore) -> dict[str, Any]:
    """Every key the store holds for its group and topic (the meta hash with the applied
    offset, the epochs and their cuts; each epoch's states; the outbox; the seen set; whatever
    else the layout keeps), read raw from Redis."""
    client = store.client
    out: dict[str, Any] = {}
    for key in client.scan_iter(match=f"{{{store.prefix}:{store.group}:{store.topic}:*", count=1000):
        kind = client.type(key)
        if kind == b"hash":
            out[key.decode()] = client.hgetall(key)
        elif kind == b"set":
            out[key.decode()] = client.smembers(key)
        elif kind == b"zset":
            out[key.decode()] = client.zrange(key, 0, -1, withscores=True)
        elif kind == b"string":
            out[key.decode()] = client.get(key)
        elif kind == b"list":
            out[key.decode()] = client.lrange(key, 0, -1)
        else:
            raise AssertionError(f"unexpected key {key!r} of type {kind!r}")
    return out


def store_state(store: OnlineStore, partitions: int, identities: dict[int, list[str]]) -> tuple[Any, ...]:
    """What the store's contract reads: applied offsets, every epoch's states, seen sets, outboxes."""
    scans = {p: store.scan(p, 0) for p in range(partitions)}
    return ({p: s[0] for p, s in scans.items()}, {p: dict(s[1]) for p, s in scans.items()},
            store.seen(identities), {p: store.pending(p) for p in range(partitions)})


def identities_of(stream: Stream, arrived: list[Located]) -> dict[int, list[str]]:
    from lakehouse.online.base import event_identity

    out: dict[int, list[str]] = {}
    for p, _, e in arrived:
        out.setdefault(p, []).append(event_identity(stream.spec.events, e))
    return out


def aof_fsynced(service: RedisService) -> bool:
    """Whether redis-server has nothing of its AOF left to write or fsync (checked twice, a
    fsync period apart, with nothing written meanwhile: `appendfsync everysec`)."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=service.settings.redis_port, socket_timeout=5)
    try:
        def idle() -> bool:
            info = client.info("persistence")
            return bool(info["aof_enabled"] == 1 and info["aof_last_write_status"] == "ok"
                        and info["aof_buffer_length"] == 0 and info["aof_pending_bio_fsync"] == 0
                        and info["aof_rewrite_in_progress"] == 0)

        size = client.info("persistence")["aof_current_size"]
        if not idle():
            return False
        time.sleep(2.0)
        return idle() and bool(client.info("persistence")["aof_current_size"] == size)
    finally:
        client.close()


def restart_redis(service: RedisService, *, kill: bool) -> None:
    """Stop the platform's redis-server (SIGTERM through its service, or SIGKILL) and start
    it again with `lambdalake up`, which finds every other service running."""
    (pid,) = service.pids()
    if kill:
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not service.pids() and not port_open("127.0.0.1", service.settings.redis_port),
                 timeout=30, every_s=0.1)
    else:
        service.stop()
    assert not service.pids() and not port_open("127.0.0.1", service.settings.redis_port)


def started_again(service: RedisService, before: int) -> None:
    result = lambdalake("up", timeout=300)
    assert "redis: starting" in result.stdout + result.stderr, result.stderr[-2000:]
    service.wait_ready()
    (pid,) = service.pids()
    assert pid != before


def test_the_store_survives_a_redis_server_restart(served: Settings) -> None:
    """The speed layer runs (in this process) across a clean stop of the platform's
    redis-server and a SIGKILL after its AOF was fsynced, each followed by a start: the store
    holds exactly what it held, the layer goes on with the next events, the API answers 503
    while the store is down and the oracle's states after, and each event is scored once."""
    stream = new_stream(served, 3000, seed=61, malformed_fraction=0.01, duplicate_fraction=0.01,
                        late_fraction=0.02)
    group, partitions = "restarted", served.kafka_partitions
    config = platform_settings(stream, group)
    service = RedisService(served)
    store = store_of(stream, group)
    thirds = [stream.messages[i * len(stream.messages) // 3:(i + 1) * len(stream.messages) // 3] for i in range(3)]
    started = time.monotonic()
    with LiveLayer(stream, group) as layer, running_api(config, stream) as api, api.client() as client:
        for part, kill in ((thirds[0], False), (thirds[1], True)):
            send(stream, part)
            ends = last_offsets(served, stream.topic)
            wait_caught_up(layer, store, ends)
            if kill:
                wait_for(lambda: aof_fsynced(service), timeout=60, every_s=0.5)
            arrived = arrivals(stream)
            identities = identities_of(stream, arrived)
            raw, contract = store_contents(store), store_state(store, partitions, identities)
            assert contract[0] == ends and any(contract[1].values()) and any(contract[2].values())
            (pid,) = service.pids()
            restart_redis(service, kill=kill)
            down = client.get("/v1/entities/user_id/u001/features")
            assert down.status_code == 503, down.text
            assert "online store" in down.json()["detail"]
            layer.check()  # waiting, not failed
            started_again(service, pid)
            assert store_contents(store) == raw
            assert store_state(store, partitions, identities) == contract
            layer.check()
        send(stream, thirds[2])
        ends = last_offsets(served, stream.topic)
        wait_caught_up(layer, store, ends)
        layer.check()
        wait_for(lambda: sql_states(client, stream.spec.views[0])[0] == ends, timeout=60, every_s=0.5)
        taken = [(view, *sql_states(client, view)[::2]) for view in stream.spec.views]
        arrived = arrivals(stream)
        bodies = [entity_answer(client, field, entity) for field, entity in sample_entities(arrived)]
    print(f"restart test: {time.monotonic() - started:.1f}s")
    assert all(coverage == ends for _, coverage, _ in taken)
    assert_sql_equals_the_oracle(stream.spec, arrived, taken)
    assert all(as_coverage(b["coverage"]) == ends for b in bodies)
    assert_entities_equal_the_oracle(stream.spec, arrived, bodies)
    assert_scored_once(stream, stream.valid_ids)


# --------------------------------------------------------------------- 2. /v1/predict in a handover
def probe_events(stream: Stream, every: int = 7) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Events to ask /v1/predict about (as JSON, and typed by the spec): transactions of the
    stream's users at their own times, under new ids (/predict records nothing)."""
    out = []
    for i, m in enumerate(m for m in stream.messages[::every] if m.kind in ("valid", "late")):
        body = {**json.loads(m.value), "event_id": f"probe-{i}"}
        out.append((body, stream.spec.events.parse(json.dumps(body).encode())))
    return out


def assert_predictions_equal_the_oracle(spec: Any, arrived: list[Located],
                                        answers: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    """Each (typed probe, /v1/predict answer): the features the oracle derives from the
    events at or below the coverage vector the answer reports, every one of them, bit for bit."""
    for tables, group in by_coverage(spec, arrived, answers, lambda answer: as_coverage(answer[1]["coverage"])):
        own = own_states(tables)
        for event, body in group:
            mine = {v.name: own[v.name].get(event[v.entity], {}) for v in spec.views}
            assert body["features"] == oracle_features(spec, mine, event), (event["event_id"], body["coverage"])


def test_predict_during_a_handover_answers_as_of_the_coverage_it_reports(served: Settings, spark: Any) -> None:
    """A first run floors the store before the speed layer ever stepped; the layer scores a
    second third of the stream; then a views job cuts the store and publishes while the last
    third streams in and /v1/predict and /v1/entities are asked all the time: every answer
    is 200 and equals the oracle as of the coverage vector (and run) it reports, on the old
    run, between the cut and the publication, and on the new run."""
    stream = new_stream(served, 3000, seed=62, malformed_fraction=0.01, duplicate_fraction=0.01)
    group = "handover"
    config = platform_settings(stream, group)
    store = store_of(stream, group)
    thirds = [stream.messages[i * len(stream.messages) // 3:(i + 1) * len(stream.messages) // 3] for i in range(3)]
    probes = probe_events(stream)
    started = time.monotonic()
    send(stream, thirds[0])
    jobs.run_ingest(config, stream.spec, spark=spark, topics=[stream.topic], echo=quiet)
    jobs.run_validate(config, stream.spec, spark=spark, schemas=[stream.spec.events], echo=quiet)
    first = jobs.run_views(config, stream.spec, spark=spark, echo=quiet)  # floors: never stepped
    assert first.boundary == last_offsets(served, stream.topic)
    print(f"handover test: first run after {time.monotonic() - started:.1f}s")
    predictions: list[tuple[dict[str, Any], dict[str, Any]]] = []
    entities: list[dict[str, Any]] = []
    with LiveLayer(stream, group) as layer, running_api(config, stream) as api, api.client() as client:
        send(stream, thirds[1])
        ends = last_offsets(served, stream.topic)
        wait_caught_up(layer, store, ends)
        handover: dict[str, Any] = {}

        def views_job() -> None:
            try:
                handover["run"] = jobs.run_views(config, stream.spec, spark=spark, echo=quiet)
            except BaseException as error:  # noqa: BLE001 - raised by the test below
                handover["error"] = error

        def stream_the_rest() -> None:
            from lakehouse.generator import produce
            from lakehouse.streams import producer

            kafka = producer(stream.settings.kafka_bootstrap_servers)
            try:
                produce([m._replace(topic=stream.topic) for m in thirds[2]], producer=kafka, rate=25.0)
            finally:
                kafka.close()

        workers = [threading.Thread(target=views_job), threading.Thread(target=stream_the_rest)]
        for worker in workers:
            worker.start()
        i, after_publication = 0, None
        while after_publication is None or time.monotonic() - after_publication < 5 or workers[1].is_alive():
            assert time.monotonic() - started < 600, "the handover took too long"
            event_json, event = probes[i % len(probes)]
            i += 1
            answer = client.post("/v1/predict", json=event_json)
            assert answer.status_code == 200, answer.text
            predictions.append((event, answer.json()))
            for field in ("user_id", "merchant_id"):
                entities.append(entity_answer(client, field, event[field]))
            if after_publication is None and not workers[0].is_alive():
                after_publication = time.monotonic()
        for worker in workers:
            worker.join(timeout=300)
        if "error" in handover:
            raise handover["error"]
        second = handover["run"]
        ends = last_offsets(served, stream.topic)
        wait_caught_up(layer, store, ends)
        layer.check()
        for event_json, event in probes[:20]:  # settled: everything applied
            predictions.append((event, client.post("/v1/predict", json=event_json).json()))
    print(f"handover test: {len(predictions)} predictions, {len(entities)} entity reads, "
          f"{time.monotonic() - started:.1f}s")
    arrived = arrivals(stream)
    runs = {first.run_id: first, second.run_id: second}
    for body in [b for _, b in predictions] + entities:
        run = runs[body["batch_run_id"]]  # only the two runs, never none
        assert as_coverage(body["boundary"]) == run.boundary
        assert all(as_coverage(body["coverage"])[p] >= o for p, o in run.boundary.items())
    seen_runs = [b["batch_run_id"] for _, b in predictions]
    assert seen_runs[0] == first.run_id and seen_runs[-1] == second.run_id
    assert seen_runs.index(second.run_id) > 0 and first.run_id not in seen_runs[seen_runs.index(second.run_id):]
    between = [b for _, b in predictions if b["batch_run_id"] == first.run_id and any(
        as_coverage(b["coverage"])[p] > o for p, o in second.boundary.items())]
    assert between, "no answer was read between the second run's cut and its publication"
    assert len({json.dumps(b["coverage"]) for _, b in predictions}) > 5  # asked while it moved
    assert as_coverage(predictions[-1][1]["coverage"]) == ends
    assert_predictions_equal_the_oracle(stream.spec, arrived, predictions)
    assert_entities_equal_the_oracle(stream.spec, arrived, entities)


# --------------------------------------------------------------------- 3. maintenance meanwhile
def scored_history(stream: Stream) -> list[str]:
    """The operations of speed/scored_events' commits, oldest first."""
    from deltalake import DeltaTable

    return [c["operation"] for c in reversed(DeltaTable(stream.lakehouse.scored_events).history())]


def test_exact_merge_while_maintenance_compacts_scored_events(served: Settings) -> None:
    """The maintenance job (OPTIMIZE, VACUUM, checkpoint of every table) runs again and again
    while the stream arrives and the speed layer appends its outbox to scored_events every
    0.2 s: SQL and /v1/entities equal the oracle at every moment asked, the job compacts
    scored_events between the layer's appends, and afterwards scored_events holds each event
    exactly once."""
    stream = new_stream(served, 3000, seed=63, malformed_fraction=0.01, duplicate_fraction=0.01)
    group = "maintained"
    config = platform_settings(stream, group)
    store = store_of(stream, group)
    started = time.monotonic()
    upkeeps: list[dict[str, Any]] = []
    failures: list[BaseException] = []
    taken: list[tuple[Any, ...]] = []
    bodies: list[dict[str, Any]] = []
    entities = [("user_id", m.user_id) for m in stream.messages[::97]] + [("merchant_id", "m0001")]
    with LiveLayer(stream, group, flush_s=0.2) as layer, running_api(config, stream) as api, \
            api.client() as client:
        streaming = threading.Event()

        def stream_it() -> None:
            from lakehouse.generator import produce
            from lakehouse.streams import producer

            kafka = producer(stream.settings.kafka_bootstrap_servers)
            try:
                produce([m._replace(topic=stream.topic) for m in stream.messages], producer=kafka, rate=150.0)
            finally:
                kafka.close()
                streaming.clear()

        def maintain() -> None:
            while streaming.is_set():
                try:
                    for upkeep in jobs.maintenance(config, stream.spec, echo=quiet):
                        if upkeep["table"] == "speed/scored_events":
                            upkeeps.append(upkeep)
                except BaseException as error:  # noqa: BLE001 - the test reports it
                    failures.append(error)
                    return
                time.sleep(0.5)

        streaming.set()
        workers = [threading.Thread(target=stream_it), threading.Thread(target=maintain)]
        for worker in workers:
            worker.start()
        while streaming.is_set():  # several moments while both run
            assert time.monotonic() - started < 400, "streaming took too long"
            for view in stream.spec.views:
                coverage, _, states = sql_states(client, view)
                taken.append((view, coverage, states))
            bodies.extend(entity_answer(client, field, entity) for field, entity in entities)
            layer.check()
            time.sleep(1.0)
        for worker in workers:
            worker.join(timeout=300)
        ends = last_offsets(served, stream.topic)
        wait_caught_up(layer, store, ends)
        final = jobs.maintenance(config, stream.spec, echo=quiet)  # everything in Delta: compacted once more
        wait_for(lambda: sql_states(client, stream.spec.views[0])[0] == ends, timeout=60, every_s=0.5)
        for view in stream.spec.views:
            taken.append((view, *sql_states(client, view)[::2]))
        bodies.extend(entity_answer(client, field, entity) for field, entity in entities)
    print(f"maintenance test: {len(upkeeps)} upkeeps of scored_events while streaming, "
          f"{len(taken)} SQL reads, {len(bodies)} entity reads, {time.monotonic() - started:.1f}s")
    assert not failures, failures[0]
    compactions = [u for u in upkeeps if u["files_removed_by_compaction"] > 0]
    assert len(compactions) >= 2, upkeeps  # it compacted while the layer appended
    history = scored_history(stream)
    first_optimize = history.index("OPTIMIZE")
    assert "WRITE" in history[first_optimize + 1:]  # appends went on after a compaction
    assert len({tuple(sorted(c.items())) for _, c, _ in taken}) >= 3  # several moments
    arrived = arrivals(stream)
    assert_sql_equals_the_oracle(stream.spec, arrived, taken)
    assert_entities_equal_the_oracle(stream.spec, arrived, bodies)
    assert [u for u in final if u["table"] == "speed/scored_events"]
    assert_scored_once(stream, stream.valid_ids)


# --------------------------------------------------------------------- 4. partitions at different positions
POOL_EVENTS = 1200


def send_to_partitions(stream: Stream, messages: list[Any], partition_of: dict[bytes, int]) -> None:
    """Each message to its key's chosen partition (a key's events stay in one partition)."""
    from lakehouse.streams import producer

    kafka = producer(stream.settings.kafka_bootstrap_servers)
    try:
        for m in messages:
            kafka.send(stream.topic, key=m.key, value=m.value, partition=partition_of[m.key])
        kafka.flush()
    finally:
        kafka.close()


@hypothesis_settings(max_examples=4, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(consumed=st.lists(st.integers(0, 250), min_size=4, max_size=4),
       unconsumed=st.lists(st.integers(0, 40), min_size=4, max_size=4),
       part_way=st.none() | st.integers(1, 250), seed=st.integers(0, 10_000))
@example(consumed=[0, 250, 7, 60], unconsumed=[25, 0, 40, 3], part_way=None, seed=64)
def test_partitions_at_different_positions_equal_the_oracle_as_of_the_coverage(
        served: Settings, consumed: list[int], unconsumed: list[int], part_way: int | None, seed: int) -> None:
    """Per partition, some events the speed layer consumes (all of them, or until it stops
    after `part_way` records) and some it never sees: SQL (every merged.<view>_states),
    /v1/entities and /v1/predict over HTTP equal the oracle as of the coverage vector they
    report, which is the store's applied offsets; scored_events holds the covered events once."""
    import zlib

    from lakehouse.serve import serve_scorer
    from speed.consumer import SpeedLayer, SpeedOptions

    stream = new_stream(served, POOL_EVENTS, seed=seed, malformed_fraction=0.01, duplicate_fraction=0.01)
    partitions = served.kafka_partitions
    group = "positions"
    partition_of = {m.key: zlib.crc32(m.key) % partitions for m in stream.messages}
    mine = {p: [m for m in stream.messages if partition_of[m.key] == p] for p in range(partitions)}
    first = {p: mine[p][:consumed[p]] for p in mine}
    later = {p: mine[p][consumed[p]:consumed[p] + unconsumed[p]] for p in mine}
    in_order = {id(m) for p in first for m in first[p]}
    send_to_partitions(stream, [m for m in stream.messages if id(m) in in_order], partition_of)
    layer = SpeedLayer(stream.settings, stream.spec, serve_scorer(), lakehouse=stream.lakehouse,
                       options=SpeedOptions(group_id=group, max_batch=50, run_check_s=0.5))
    layer.run(threading.Event(), idle_exit_s=3.0, max_events=part_way)
    in_order = {id(m) for p in later for m in later[p]}
    send_to_partitions(stream, [m for m in stream.messages if id(m) in in_order], partition_of)

    store = store_of(stream, group)
    applied = store.applied(range(partitions))
    sent = {p: len(first[p]) - 1 for p in range(partitions)}
    if part_way is None:
        assert applied == sent
    else:
        assert all(applied[p] <= sent[p] for p in applied)
    ends = last_offsets(served, stream.topic)
    assert ends == {p: len(first[p]) + len(later[p]) - 1 for p in range(partitions)}
    print(f"positions: part_way={part_way}, applied {applied}, Kafka holds {ends}")
    config = platform_settings(stream, group)
    with running_api(config, stream) as api, api.client() as client:
        taken = [(view, *sql_states(client, view)[::2]) for view in stream.spec.views]
        arrived = arrivals(stream)
        bodies = [entity_answer(client, field, entity) for field, entity in sample_entities(arrived, every=5)]
        probes = probe_events(stream, every=61)
        predictions = []
        for event_json, event in probes:
            answer = client.post("/v1/predict", json=event_json)
            assert answer.status_code == 200, answer.text
            predictions.append((event, answer.json()))
    assert all(coverage == applied for _, coverage, _ in taken)
    assert all(as_coverage(b["coverage"]) == applied for b in bodies)
    assert all(as_coverage(b["coverage"]) == applied for _, b in predictions)
    assert_sql_equals_the_oracle(stream.spec, arrived, taken)
    assert_entities_equal_the_oracle(stream.spec, arrived, bodies)
    assert_predictions_equal_the_oracle(stream.spec, arrived, predictions)
    covered = {e["event_id"] for p, o, e in arrived if o <= applied[p]}
    assert_scored_once(stream, covered)
