"""The serving layer against real Kafka, Spark + Delta, the speed layer and Ray Serve: merged
views equal a recomputation from the Kafka topic itself on both engines, /predict scores as
the speed layer does, keys and scopes are enforced, SQL escapes fail over HTTP, a fuzzer
finds no server error, and a rollout splits traffic by its weights."""

from __future__ import annotations

import dataclasses
import io
import json
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from batch.ingest import ingest_topics
from batch.validate import validate_topic
from batch.views import BatchRun, compute_views
from lakehouse.config import Settings
from lakehouse.errors import SqlError, ValidationError
from lakehouse.online import open_store
from lakehouse.online.base import OnlineStore
from lakehouse.spec import format_timestamp_ms
from serving.duck import DuckEngine
from tests.fuzzing import every_input_operation_fuzzed, fuzz_operations
from tests.integration.models import publish, random_model
from tests.integration.streams import Stream, new_stream, run_in_process, scored, send, serve_champion
from tests.integration.test_serving_engine import Arrived, recompute

pytestmark = pytest.mark.integration

GROUP = "serving-it"
ADMIN, READER = "admin-key-0123456789abcdef", "reader-key-0123456789abcdef"


@dataclasses.dataclass
class World:
    stream: Stream
    settings: Settings
    run: BatchRun


@pytest.fixture(scope="module")
def served(ray_cluster: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    yield from serve_champion(ray_cluster, tmp_path_factory.mktemp("bundles"))


def batch_run(spark: Any, stream: Stream) -> BatchRun:
    ingest_topics(spark, stream.lakehouse, bootstrap_servers=stream.settings.kafka_bootstrap_servers,
                  topics=[stream.topic])
    validate_topic(spark, stream.lakehouse, stream.spec.events, gx_dir=Path(stream.lakehouse.root) / "gx")
    return compute_views(spark, stream.lakehouse, stream.spec, store=store_of(stream),
                         partitions=stream.settings.kafka_partitions)


def store_of(stream: Stream) -> OnlineStore:
    """The online store of GROUP over the stream's lakehouse (what the API's settings open)."""
    return open_store(stream.settings, stream.spec, group=GROUP, root=stream.lakehouse.root)


@pytest.fixture(scope="module")
def world(served: Settings, spark: Any) -> World:
    """Half a stream in the batch views; all of it scored by the speed layer."""
    stream = new_stream(served, 3000, seed=51, malformed_fraction=0.02, duplicate_fraction=0.01,
                        late_fraction=0.03)
    half = len(stream.messages) // 2
    send(stream, stream.messages[:half])
    run = batch_run(spark, stream)
    send(stream, stream.messages[half:])
    run_in_process(stream, group=GROUP)
    settings = served.model_copy(update={
        "speed_group": GROUP, "delta_root": stream.lakehouse.root,
        "api_keys": SecretStr(f"admin:{ADMIN}:predict+features+sql,reader:{READER}:sql"),
        "serving_refresh_s": 0.5, "sql_row_cap": 500})
    return World(stream, settings, run)


def from_kafka(stream: Stream) -> list[Arrived]:
    """Every valid, first-seen event of the topic with its partition and offset."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(stream.topic, bootstrap_servers=stream.settings.kafka_bootstrap_servers,
                             auto_offset_reset="earliest", consumer_timeout_ms=5000,
                             group_id=f"recompute-{uuid.uuid4().hex[:6]}")
    records = sorted(consumer, key=lambda r: (r.partition, r.offset))
    consumer.close()
    assert len(records) == len(stream.messages)
    seen: set[str] = set()
    out = []
    for r in records:
        try:
            event = stream.spec.events.parse(r.value)
        except ValidationError:
            continue
        if event["event_id"] not in seen:
            seen.add(event["event_id"])
            out.append(Arrived(r.partition, r.offset, event))
    return out


def states_of(rows: list[dict[str, Any]], view: Any) -> dict[tuple[Any, int], dict[str, int]]:
    return {(r[view.entity], r["bucket_start_ms"]): {n: int(r[n]) for n in view.aggregations} for r in rows}


def assert_rows_close(left: list[dict[str, Any]], right: list[dict[str, Any]]) -> None:
    """Equal rows; derived floats may differ in the last bits between engines."""
    assert len(left) == len(right)
    for a, b in zip(left, right, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            if isinstance(a[name], float):
                assert a[name] == pytest.approx(b[name], rel=1e-12), name
            else:
                assert a[name] == b[name], name


def test_merged_views_equal_a_recomputation_from_kafka_on_both_engines(world: World, spark: Any) -> None:
    from serving.spark_sql import SparkEngine

    stream = world.stream
    arrived = from_kafka(stream)
    duck = DuckEngine(stream.spec, stream.lakehouse, store=store_of(stream),
                      partitions=world.settings.kafka_partitions)
    snapshot = duck.refresh()
    ends = {p: max(a.offset for a in arrived if a.partition == p) for p in {a.partition for a in arrived}}
    assert snapshot.run_id == world.run.run_id and snapshot.increments > 0
    assert all(snapshot.coverage[p] >= ends[p] for p in ends)  # the speed layer read everything
    expected = recompute(arrived, snapshot.coverage)
    sparks = SparkEngine(spark, stream.spec, stream.lakehouse, store=store_of(stream),
                         partitions=world.settings.kafka_partitions)
    assert sparks.register().coverage == snapshot.coverage
    for view in stream.spec.views:
        query = f"SELECT * FROM merged.{view.name}_states"
        assert states_of(duck.query(query, row_cap=10**6).table.to_pylist(), view) == expected[view.name]
        assert states_of(sparks.query(query, row_cap=10**6)[0].to_pylist(), view) == expected[view.name]
        per_entity = f"SELECT * FROM merged.{view.name} ORDER BY {view.entity}"
        assert_rows_close(duck.query(per_entity, row_cap=10**6).table.to_pylist(),
                          sparks.query(per_entity, row_cap=10**6)[0].to_pylist())

    second = batch_run(spark, stream)  # right after a new cut: every increment is in its gold
    snapshot = duck.refresh()
    assert snapshot.run_id == second.run_id and snapshot.increments == 0
    for view in stream.spec.views:
        rows = duck.query(f"SELECT * FROM merged.{view.name}_states", row_cap=10**6).table.to_pylist()
        assert states_of(rows, view) == recompute(arrived, snapshot.coverage)[view.name]
    files_setting = spark.conf.get("spark.sql.runSQLOnFiles")
    assert sparks.register().run_id == second.run_id
    assert spark.conf.get("spark.sql.runSQLOnFiles") == files_setting  # register() restores it
    with pytest.raises(Exception, match="only one SELECT"):
        sparks.query("DROP VIEW merged.user_all")
    with pytest.raises(Exception, match="cannot be found|TABLE_OR_VIEW_NOT_FOUND"):
        sparks.query("SELECT * FROM csv.`/etc/passwd`")
    for escape in ("SELECT reflect('java.lang.System', 'getProperty', 'user.home') AS h",
                   "SELECT java_method('java.lang.System', 'getProperty', 'user.home') AS h",
                   "SELECT TRANSFORM(user_id) USING 'cat' AS (x) FROM merged.user_all"):
        with pytest.raises(SqlError, match="not allowed"):
            sparks.query(escape)


# ------------------------------------------------------------------------------- the HTTP API
@dataclasses.dataclass
class Api:
    url: str
    world: World
    server: Any

    def client(self, key: str | None = ADMIN) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": key} if key else {}, timeout=60)


def start_api(settings: Settings, stream: Stream) -> Iterator[Api]:
    import uvicorn

    from serving.api import create_app
    from serving.server import build_serving

    serving, _ = build_serving(settings, stream.spec, lakehouse=stream.lakehouse)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(serving), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the API never became ready"
        time.sleep(0.5)
    yield Api(url, None, server)  # type: ignore[arg-type]
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def api(world: World) -> Iterator[Api]:
    for running in start_api(world.settings, world.stream):
        running.world = world
        yield running


def next_event(stream: Stream, **changes: Any) -> dict[str, Any]:
    """A new transaction of a known user, after everything the stream holds."""
    last = json.loads(max((m for m in stream.messages if m.kind == "valid"), key=lambda m: m.event_time_ms).value)
    latest = max(m.event_time_ms for m in stream.messages if m.event_time_ms is not None)
    return {**last, "event_id": f"probe-{uuid.uuid4().hex[:8]}",
            "event_time": format_timestamp_ms(latest + 1000), **changes}


def stranger_event(event: dict[str, Any]) -> dict[str, Any]:
    return {**event, "user_id": "nobody-known", "merchant_id": "nowhere"}


def test_predict_scores_an_event_as_the_speed_layer_does(api: Api) -> None:
    from lakehouse.streams import producer

    stream = api.world.stream
    event = next_event(stream)
    with api.client() as client:
        answer = client.post("/v1/predict", json=event)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["defaults_used_for"] == [] and body["batch_run_id"] and body["model_version"] == 1
    with api.client() as client:  # the same event again: the cache answers, with the same score
        again = client.post("/v1/predict", json=event).json()
    assert again["cached"] is True and again["score"] == body["score"]
    kafka = producer(stream.settings.kafka_bootstrap_servers)
    kafka.send(stream.topic, key=event["user_id"].encode(), value=json.dumps(event).encode())
    kafka.flush()
    kafka.close()
    run_in_process(stream, group=GROUP)
    row = next(r for r in scored(stream) if r["event_id"] == event["event_id"])
    assert dict(zip(stream.spec.feature_names, row["features"], strict=True)) == body["features"]
    assert row["model_version"] == body["model_version"]
    assert body["score"] == pytest.approx(row["score"], rel=1e-6, abs=1e-9)

    with api.client() as client:
        stranger = client.post("/v1/predict", json={**event, "user_id": "nobody-known",
                                                   "merchant_id": "nowhere"}).json()
        other = {**event, "event_id": "b2", "amount": 4321.5, "channel": "atm"}
        many = client.post("/v1/predict/batch", json={"events": [event, other, stranger_event(event)]})
        one_by_one = [client.post("/v1/predict", json=e).json() for e in (event, other, stranger_event(event))]
    assert stranger["defaults_used_for"] == ["merchant_id", "user_id"]
    assert stranger["features"]["user_count_24h"] == 0.0
    assert many.status_code == 200, many.text
    predictions = many.json()["predictions"]
    assert [p["event_id"] for p in predictions] == [event["event_id"], "b2", event["event_id"]]
    for batched, single in zip(predictions, one_by_one, strict=True):  # each event's own answer
        assert batched["score"] == pytest.approx(single["score"], abs=1e-9)
        assert batched["features"] == single["features"] and batched["model_version"] == single["model_version"]
    assert predictions[0]["score"] != predictions[1]["score"]  # not one answer repeated


ROUTES = [("post", "/v1/predict", "predict"), ("post", "/v1/predict/batch", "predict"),
          ("get", "/v1/entities/user_id/u001/features", "features"), ("post", "/v1/sql", "sql")]


@pytest.mark.parametrize(("method", "path", "scope"), ROUTES)
def test_every_protected_route_needs_a_key_with_its_scope(api: Api, method: str, path: str, scope: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="lambdalake.audit")
    body = {"query": "SELECT 1 AS one"} if scope == "sql" else (
        next_event(api.world.stream) if path == "/v1/predict" else {"events": [next_event(api.world.stream)]})
    kwargs: dict[str, Any] = {"json": body} if method == "post" else {}
    for key, expected in ((None, 401), ("not-a-key-at-all-123456", 401),
                          (READER, 200 if scope == "sql" else 403), (ADMIN, 200)):
        with api.client(key) as client:
            response = getattr(client, method)(path, **kwargs)
        assert response.status_code == expected, (key, response.text)
    audited = [json.loads(r.getMessage()) for r in caplog.records if r.name == "lambdalake.audit"]
    assert [a["status"] for a in audited if a["route"] == path.replace("user_id/u001", "{entity}/{entity_id}")
            or a["route"] == path][-4:] == [401, 401, 200 if scope == "sql" else 403, 200]
    assert {"admin", "reader"} <= {a["caller"] for a in audited}
    assert not any(ADMIN in r.getMessage() or READER in r.getMessage() for r in caplog.records)
    for open_path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
        assert httpx.get(api.url + open_path, timeout=30).status_code == 200


@pytest.mark.parametrize("query", [
    "SELECT * FROM read_csv('/etc/passwd')", "COPY merged.user_all TO '/tmp/lambdalake-x.csv'",
    "ATTACH '/tmp/lambdalake-x.db'", "INSTALL httpfs", "LOAD httpfs", "DROP VIEW merged.user_all",
    "SET enable_external_access = true", "SELECT 1; SELECT 2", "SELEC nonsense",
    "SELECT * FROM duckdb_settings()", "SELECT current_setting('temp_directory') AS t",
    "SELECT * FROM duckdb_databases()", "SELECT * FROM glob('.tmp/*')", "SELECT * FROM read_text('.tmp/x')",
    "SELECT * FROM pg_catalog.pg_settings"])
def test_sql_escapes_get_a_4xx_over_http(api: Api, query: str) -> None:
    with api.client() as client:
        response = client.post("/v1/sql", json={"query": query})
    assert response.status_code == 400, response.text
    assert response.json()["detail"]


def test_sql_answers_json_and_arrow_and_features_match(api: Api) -> None:
    import pyarrow as pa

    with api.client() as client:
        top = client.post("/v1/sql", json={"query": "SELECT * FROM merged.user_all ORDER BY count DESC"})
        arrow = client.post("/v1/sql", json={"query": "SELECT user_id, count FROM merged.user_all",
                                             "format": "arrow"})
        capped = client.post("/v1/sql", json={"query": "SELECT * FROM range(10000)"})
        user = top.json()["rows"][0]
        features = client.get(f"/v1/entities/user_id/{user['user_id']}/features").json()
        nobody = client.get("/v1/entities/user_id/nobody-known/features").json()
        kind = client.get("/v1/entities/planet/x/features")
    assert top.status_code == 200 and top.json()["truncated"] is False
    table = pa.ipc.open_stream(io.BytesIO(arrow.content)).read_all()
    assert table.num_rows == top.json()["row_count"]
    assert capped.json()["row_count"] == 500 and capped.json()["truncated"] is True
    assert features["known"] is True
    assert features["views"]["user_all"]["count"] == user["count"]
    assert features["views"]["user_all"]["mean_amount"] == pytest.approx(user["mean_amount"])
    assert nobody["known"] is False and nobody["views"]["user_all"]["count"] == 0
    assert kind.status_code == 404


def test_bad_input_gets_a_4xx_with_a_reason(api: Api) -> None:
    event = next_event(api.world.stream)
    cases = [
        (b"{not json", 422), (json.dumps({**event, "amount": "12"}).encode(), 422),
        (json.dumps({k: v for k, v in event.items() if k != "user_id"}).encode(), 422),
        (json.dumps({**event, "surprise": 1}).encode(), 422),
        (json.dumps(event).replace(str(event["amount"]), "NaN", 1).encode(), 422),
        (json.dumps(event).replace(str(event["amount"]), "Infinity", 1).encode(), 422),
        (b"x" * 2_000_000, 413), (b"[]", 422), (b"", 422)]
    with api.client() as client:
        for body, expected in cases:
            response = client.post("/v1/predict", content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == expected, (body[:80], response.text)
            assert response.json()["detail"]
        too_many = client.post("/v1/predict/batch", json={"events": [event] * 1001})
        assert too_many.status_code == 413
        not_json = client.post("/v1/predict/batch", content=b"{", headers={"Content-Type": "application/json"})
        assert not_json.status_code == 400
        bad_sql_body = client.post("/v1/sql", json={"query": 42})
        assert bad_sql_body.status_code == 422




def test_openapi_fuzzing_finds_no_server_error(api: Api) -> None:
    """Every operation of the OpenAPI document, FUZZ_EXAMPLES positive and as many negative
    (schema-violating) cases each, with a key; then the hostile bodies on every POST route,
    without and with a key: no answer is a 5xx."""
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    tried, failures = fuzz_operations(
        schema, lambda case: case.call(base_url=api.url, headers={"X-API-Key": ADMIN}, timeout=30))

    limit = api.world.settings.api_max_body_bytes
    hostile = {"open_brackets": b"[" * 5000, "digits": b"7" * 5000, "digits_in_sql": (
        b'{"query": "SELECT 1", "max_rows": ' + b"9" * 5000 + b"}"), "invalid_utf8": b'{"query": "\xff\xfe"}',
        "over_the_limit": b"[" * (limit + 1)}
    statuses: Counter[tuple[str, int]] = Counter()
    for path in ("/v1/predict", "/v1/predict/batch", "/v1/sql"):
        for name, body in hostile.items():
            for key in (None, ADMIN):
                with api.client(key) as client:
                    response = client.post(path, content=body, headers={"Content-Type": "application/json"})
                tried["hostile bodies"] += 1
                statuses[(name, response.status_code)] += 1
                expected = 401 if key is None else 413 if name == "over_the_limit" else None
                if response.status_code >= 500 or not 400 <= response.status_code < 500 or (
                        expected is not None and response.status_code != expected):
                    failures.append(f"{path} {name} key={key is not None} → {response.status_code}: "
                                    f"{response.text[:200]}")
    print(f"fuzzed: {dict(tried)} ({sum(tried.values())} requests); hostile bodies: {dict(statuses)}; "
          f"failures: {len(failures)}")
    assert not failures, failures[:5]
    assert every_input_operation_fuzzed(tried), tried


def metric(exposed: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(exposed):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_metrics_count_predictions_by_version_and_cache(api: Api) -> None:
    before = httpx.get(f"{api.url}/metrics", timeout=30).text
    event = next_event(api.world.stream)
    with api.client() as client:
        for i in range(3):  # three distinct events (misses), then the first again (a hit)
            assert client.post("/v1/predict", json={**event, "event_id": f"m{i}", "amount": 10 + i}).status_code == 200
        assert client.post("/v1/predict", json={**event, "event_id": "m0", "amount": 10}).status_code == 200
    after = httpx.get(f"{api.url}/metrics", timeout=30).text

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("lambdalake_api_predictions_total", alias="champion", model_version="1") == 4
    assert grew("lambdalake_api_requests_total", route="/v1/predict", status="200") == 4
    assert grew("lambdalake_api_prediction_cache_lookups_total", result="miss") == 3
    assert grew("lambdalake_api_prediction_cache_lookups_total", result="hit") == 1
    assert grew("lambdalake_api_request_seconds_count", route="/v1/predict") == 4
    assert 0 < metric(after, "lambdalake_api_prediction_cache_hit_rate") <= 1


def test_rollout_splits_traffic_by_weight_sticky_per_entity(world: World,
                                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    from ray import serve

    from lakehouse.serve import app_name
    from speed.model_service import ServiceArgs, serve_on_ray

    settings = world.settings.model_copy(update={"rollout_challenger_weight": 0.3})
    challenger = publish(settings, random_model(8), tmp_path_factory.mktemp("challenger"), alias="challenger")
    serve_on_ray(settings.ray_address, ServiceArgs.from_settings(settings, alias="challenger", max_replicas=1))
    try:
        for running in start_api(settings, world.stream):
            event = next_event(world.stream)
            users = [f"rollout-user-{i}" for i in range(400)]
            with running.client() as client:
                first = [client.post("/v1/predict", json={**event, "user_id": u}).json() for u in users]
                again = [client.post("/v1/predict", json={**event, "user_id": u}).json() for u in users[:50]]
            aliases = Counter(answer["model_alias"] for answer in first)
            assert 0.22 <= aliases["challenger"] / len(users) <= 0.38, aliases
            assert {a["model_version"] for a in first if a["model_alias"] == "challenger"} == {challenger}
            assert {a["model_version"] for a in first if a["model_alias"] == "champion"} == {1}
            assert [a["model_alias"] for a in again] == [a["model_alias"] for a in first[:50]]
    finally:
        serve.delete(app_name("challenger"))
