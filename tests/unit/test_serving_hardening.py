"""The serving layer under hostile input (issue 11, items 9 and 10), with no services: the
FastAPI app over a real DuckEngine on an empty delta-rs lakehouse, driven in-process.

- A request to /v1 without a valid key is refused (401) before one byte of its body is read;
  a body over the limit is refused (413) on its Content-Length, or while it streams.
- No body, however built (deep nesting, 5,000-digit numbers, invalid UTF-8, duplicate keys),
  and no SQL result (infinities, NaN, dates past year 9999, every DuckDB type) answers 5xx.
- DuckDB answers no catalog, settings or file function, and its temp directory is private.
- Spark SQL refuses reflection and script transforms, and leaves `runSQLOnFiles` off.

The model arm is a plain async function (as in test_rollout.py): these tests are about the
HTTP layer, which hands feature vectors to whatever scores them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lakehouse.errors import SqlError
from lakehouse.fraud import FRAUD_SPEC
from lakehouse.registry import CHAMPION
from lakehouse.safejson import JsonRefused, decode
from lakehouse.tables import Lakehouse
from serving.api import Serving, ServingConfig, create_app
from serving.auth import ApiKeys
from serving.duck import DuckEngine
from serving.rollout import PredictionCache, Rollout
from tests.fuzzing import FUZZ_EXAMPLES, every_input_operation_fuzzed, fuzz_operations

SPEC = FRAUD_SPEC
ADMIN, READER = "admin-key-0123456789abcdef", "reader-key-0123456789abcdef"
LIMIT = 64 * 1024
MIB = 1 << 20
POSTS = ["/v1/sql", "/v1/predict", "/v1/predict/batch"]


async def champion(rows: list[list[float]]) -> dict[str, Any]:
    return {"scores": [0.5 for _ in rows], "model_version": 1}


@pytest.fixture()
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DuckEngine]:
    # the engine runs where the API process runs: its working directory must not leak
    monkeypatch.chdir(tmp_path)
    engine = DuckEngine(SPEC, Lakehouse(str(tmp_path / "delta")), store=None, partitions=2)
    engine.refresh()
    yield engine
    engine.close()


@pytest.fixture()
def app(engine: DuckEngine) -> Any:
    keys = ApiKeys.parse(f"admin:{ADMIN}:predict+features+sql,reader:{READER}:sql", where="test",
                         separator=",")
    rollout = Rollout({CHAMPION: champion}, 0.0, PredictionCache(0))
    return create_app(Serving(SPEC, engine, rollout, keys,
                              ServingConfig(max_body_bytes=LIMIT, refresh_s=3600)))


class Client:
    """Requests to the app in-process (httpx's ASGI transport; starlette's TestClient now
    warns on plain httpx). An unhandled error answers 500, as uvicorn would."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.request(method, url, **kwargs)
        return asyncio.run(send())

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)


@pytest.fixture()
def client(app: Any) -> Client:
    return Client(app)


# ------------------------------------------------------------------ raw ASGI: what is read when
class Sent:
    """One request driven through the ASGI app by hand, counting the body bytes it reads."""

    def __init__(self, app: Any, path: str, *, key: str | None, chunks: int, chunk: bytes,
                 declare_length: bool = True) -> None:
        self.consumed = 0
        self.status = 0
        self.body = b""
        headers = [(b"content-type", b"application/json")]
        if key is not None:
            headers.append((b"x-api-key", key.encode()))
        if declare_length:
            headers.append((b"content-length", str(chunks * len(chunk)).encode()))
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "root_path": "", "headers": headers, "client": ("127.0.0.1", 1), "server": ("test", 80),
                 "state": {}}
        remaining = chunks

        async def receive() -> dict[str, Any]:
            nonlocal remaining
            if remaining == 0:
                await asyncio.sleep(3600)  # the client waits for the answer
            remaining -= 1
            self.consumed += len(chunk)
            return {"type": "http.request", "body": chunk, "more_body": remaining > 0}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
            elif message["type"] == "http.response.body":
                self.body += message.get("body", b"")

        asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=60))


@pytest.mark.parametrize("path", POSTS)
@pytest.mark.parametrize("key", [None, "not-a-key-at-all-123456"])
def test_no_body_byte_is_read_before_the_key_is_checked(app: Any, path: str, key: str | None) -> None:
    sent = Sent(app, path, key=key, chunks=32, chunk=b"[" * MIB)  # 32 MiB from a stranger
    assert sent.status == 401, sent.body[:200]
    assert sent.consumed == 0
    assert "X-API-Key" in json.loads(sent.body)["detail"]


@pytest.mark.parametrize("path", POSTS)
def test_an_oversized_body_is_refused_before_it_is_read(app: Any, path: str) -> None:
    declared = Sent(app, path, key=ADMIN, chunks=32, chunk=b" " * MIB)
    assert declared.status == 413, declared.body[:200]
    assert declared.consumed == 0
    streamed = Sent(app, path, key=ADMIN, chunks=32, chunk=b" " * 4096, declare_length=False)
    assert streamed.status == 413, streamed.body[:200]
    assert streamed.consumed <= LIMIT + 4096
    assert str(LIMIT) in json.loads(streamed.body)["detail"]


def test_a_malformed_body_without_a_key_is_401_not_422(client: Client) -> None:
    for path in POSTS:
        for body in (b"{not json", b"[" * 5000, b'{"query": 42}', b""):
            response = client.post(path, content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == 401, (path, body[:20], response.text)
    assert client.get("/v1/entities/user_id/u1/features").status_code == 401
    reader = client.post("/v1/predict", json={}, headers={"X-API-Key": READER})
    assert reader.status_code == 403  # a valid key without the scope: the dependency says so


HOSTILE = {
    "deep": b"[" * 5000,
    "deep_object": b'{"query": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3000 + b"}",
    "long_number": b"9" * 5000,
    "long_number_in_object": b'{"query": "SELECT 1", "max_rows": ' + b"9" * 5000 + b"}",
    "invalid_utf8": b'{"query": "SELECT \xff\xfe"}',
    "nul": b'{"query": "SELECT 1\x00"}',
    "duplicate_key": b'{"query": "SELECT 1", "query": "SELECT 2"}',
    "nan": b'{"query": "SELECT 1", "max_rows": NaN}',
    "scalar": b"12",
    "array": b"[]",
    "empty": b"",
    "utf16": '{"query": "SELECT 1"}'.encode("utf-16"),
}


@pytest.mark.parametrize("path", POSTS)
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_bodies_get_a_4xx_with_a_reason(client: Client, path: str, name: str) -> None:
    response = client.post(path, content=HOSTILE[name],
                           headers={"Content-Type": "application/json", "X-API-Key": ADMIN})
    assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:300])
    assert response.json()["detail"]


@pytest.mark.parametrize(("name", "status", "reason"), [
    ("deep", 400, "too_deep"), ("long_number_in_object", 400, "number_too_long"),
    ("invalid_utf8", 400, "invalid_utf8"), ("duplicate_key", 400, "duplicate_key"),
    ("nan", 400, "malformed_json"), ("empty", 400, "malformed_json"), ("array", 422, "dictionary")])
def test_sql_bodies_are_refused_with_their_rule(client: Client, name: str, status: int, reason: str) -> None:
    response = client.post("/v1/sql", content=HOSTILE[name],
                           headers={"Content-Type": "application/json", "X-API-Key": ADMIN})
    assert response.status_code == status, response.text[:300]
    assert reason in json.dumps(response.json()["detail"])


def test_sql_body_fields_are_validated_after_decoding(client: Client) -> None:
    headers = {"X-API-Key": ADMIN}
    assert client.post("/v1/sql", json={"query": 42}, headers=headers).status_code == 422
    assert client.post("/v1/sql", json={"query": "SELECT 1", "format": "xml"}, headers=headers).status_code == 422
    assert client.post("/v1/sql", json={"query": "SELECT 1", "max_rows": 0}, headers=headers).status_code == 422
    detail = client.post("/v1/sql", json={"max_rows": 3}, headers=headers).json()["detail"]
    assert detail[0]["loc"] == ["body", "query"] and detail[0]["type"] == "missing"
    ok = client.post("/v1/sql", json={"query": "SELECT * FROM range(5)", "max_rows": 2}, headers=headers)
    assert ok.status_code == 200 and ok.json()["row_count"] == 2 and ok.json()["truncated"] is True


def test_the_openapi_document_still_describes_every_request_body(client: Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in POSTS:
        schema = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema.get("properties") or schema.get("$ref"), path
    sql = paths["/v1/sql"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(sql["properties"]) == {"query", "format", "max_rows"} and sql["required"] == ["query"]


def strict_json(raw: bytes) -> Any:
    """The document, refusing NaN/Infinity and anything else RFC 8259 does not allow."""
    try:
        return decode(raw)
    except JsonRefused as refused:
        raise AssertionError(f"not valid JSON: {refused}") from None


EXTREMES = [
    ("'infinity'::DOUBLE", None), ("'-infinity'::DOUBLE", None), ("'nan'::DOUBLE", None),
    ("'infinity'::FLOAT", None),
    ("DATE '294247-01-10'", "294247-01-10"), ("DATE '-4712-01-01'", "-4712-01-01"),
    ("'infinity'::DATE", "infinity"), ("'-infinity'::DATE", "-infinity"), ("DATE '2024-02-29'", "2024-02-29"),
    ("TIMESTAMP '294247-01-10 04:00:54.775806'", "294247-01-10T04:00:54.775806"),
    ("TIMESTAMP '-290308-12-22 00:00:00'", "-290308-12-22T00:00:00"),
    ("'infinity'::TIMESTAMP", "infinity"), ("'-infinity'::TIMESTAMP", "-infinity"),
    ("TIMESTAMPTZ '294247-01-09 04:00:54.775806+00'", "294247-01-09T04:00:54.775806+00:00"),
    ("'infinity'::TIMESTAMPTZ", "infinity"),
    ("TIMESTAMP_NS '2262-04-11 23:47:16.854775'", "2262-04-11T23:47:16.854775"),
    ("TIMESTAMP_S '294247-01-10 04:00:54'", "294247-01-10T04:00:54"),
    ("TIMESTAMP_MS '294247-01-10 04:00:54.775'", "294247-01-10T04:00:54.775"),
    ("TIME '23:59:59.999999'", "23:59:59.999999"), ("TIMESTAMP '2024-01-01 12:00:00'", "2024-01-01T12:00:00"),
    ("TIMETZ '12:00:00+05'", None),
    ("INTERVAL 1000000 YEARS", {"months": 12_000_000, "days": 0, "nanoseconds": 0}),
    ("TIMESTAMP '2024-01-01' - TIMESTAMP '1000-01-01'", None),
    ("170141183460469231731687303715884105727::HUGEINT", 170141183460469231731687303715884105727),
    ("340282366920938463463374607431768211455::UHUGEINT", None),
    ("9999999999999999999999999999.9999999999::DECIMAL(38, 10)", None),
    ("gen_random_uuid()", None), ("'\\xff\\x00'::BLOB", None), ("'0101'::BIT", None),
    ("[DATE '294247-01-10', NULL]", ["294247-01-10", None]),
    ("{'d': DATE '294247-01-10', 'x': 'infinity'::DOUBLE}", {"d": "294247-01-10", "x": None}),
    ("MAP {DATE '294247-01-10': 'infinity'::DOUBLE}", [["294247-01-10", None]]),
    ("union_value(t := TIMESTAMP '294247-01-10 04:00:54')", "294247-01-10T04:00:54"),
    ("'a'::ENUM('a', 'b')", "a"), ("1e308 * 10", None), ("'\\u0000'", None),
]


@pytest.mark.parametrize(("expression", "expected"), EXTREMES, ids=[e for e, _ in EXTREMES])
def test_sql_results_are_valid_json_whatever_the_values(client: Client, expression: str,
                                                        expected: Any) -> None:
    response = client.post("/v1/sql", json={"query": f"SELECT {expression} AS v"}, headers={"X-API-Key": ADMIN})
    assert response.status_code == 200, response.text[:300]
    document = strict_json(response.content)
    value = document["rows"][0]["v"]
    if expected is not None:
        assert value == expected
    if "DOUBLE" in expression and expression.startswith("'"):
        assert value is None  # non-finite floats are null (the Arrow format keeps them exactly)
    arrow = client.post("/v1/sql", json={"query": f"SELECT {expression} AS v", "format": "arrow"},
                        headers={"X-API-Key": ADMIN})
    assert arrow.status_code == 200 and arrow.headers["x-row-count"] == "1"


def iso(duckdb_text: str) -> str:
    """DuckDB's text of a date or timestamp as ISO-8601 with astronomical years (1 BC = 0)."""
    parts = re.fullmatch(r"(\d+)-(\d\d-\d\d)( \(BC\))?(?: (.+))?", duckdb_text)
    assert parts, duckdb_text
    year = 1 - int(parts[1]) if parts[3] else int(parts[1])
    text = f"{'-' if year < 0 else ''}{abs(year):04d}-{parts[2]}"
    clock = parts[4] or ""
    if "." in clock:  # DuckDB drops trailing zeros; ISO-8601 from Python writes microseconds
        whole, fraction = clock.split(".")
        clock = f"{whole}.{fraction.ljust(6, '0')}"
    return text + ("T" + clock if clock else "")


@pytest.mark.parametrize(("start", "sign"), [("9999-12-31", "+"), ("0001-01-01", "-")])
def test_times_beyond_pythons_range_are_written_as_duckdb_writes_them(client: Client, start: str,
                                                                      sign: str) -> None:
    query = (f"SELECT d, CAST(d AS VARCHAR) AS d_text, t, CAST(t AS VARCHAR) AS t_text FROM ("
             f"SELECT DATE '{start}' {sign} CAST(i * 7919 AS INTEGER) AS d, "
             f"TIMESTAMP '{start} 23:59:59.5' {sign} to_microseconds(i * 790000000000123) AS t "
             f"FROM range(1, 300) r(i))")
    response = client.post("/v1/sql", json={"query": query}, headers={"X-API-Key": ADMIN})
    assert response.status_code == 200, response.text[:300]
    rows = strict_json(response.content)["rows"]
    assert len(rows) == 299
    for row in rows:
        assert (row["d"], row["t"]) == (iso(row["d_text"]), iso(row["t_text"]))


# ------------------------------------------------------------------ fuzzing the whole app
EXPLICIT = {"open_brackets": b"[" * 5000, "digits": b"7" * 5000, "invalid_utf8": b"\xff\xfe\xfd{",
            "over_the_limit": b"[" + b"1," * LIMIT + b"1]"}


@pytest.mark.parametrize("path", POSTS)
@pytest.mark.parametrize("key", [None, ADMIN])
def test_explicit_hostile_bodies_get_no_server_error(client: Client, path: str, key: str | None) -> None:
    headers = {"Content-Type": "application/json", **({"X-API-Key": key} if key else {})}
    for name, body in EXPLICIT.items():
        response = client.post(path, content=body, headers=headers)
        expected = 401 if key is None else 413 if name == "over_the_limit" else None
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:200])
        assert expected is None or response.status_code == expected, (name, response.text[:200])




@pytest.mark.slow
def test_openapi_fuzzing_finds_no_server_error(app: Any) -> None:
    """Every operation of the OpenAPI document, FUZZ_EXAMPLES positive and as many negative
    (schema-violating) cases each, with a key: no answer is a 5xx."""
    import schemathesis

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    tried, failures = fuzz_operations(schema, lambda case: case.call(headers={"X-API-Key": ADMIN}))
    print(f"fuzzed: {tried}; 5xx: {len(failures)}")
    assert not failures, failures[:5]
    assert every_input_operation_fuzzed(tried), tried


@pytest.mark.slow
def test_any_body_answers_a_4xx_or_an_answer_never_a_5xx(client: Client) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    documents = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=20).map(lambda d: json.dumps(d).encode())
    shaped = st.one_of(
        st.builds(lambda n, fill: fill * n, st.integers(1, 6000), st.sampled_from([b"[", b'{"a":', b"9", b"-0."])),
        st.builds(lambda q, n: json.dumps({"query": q, "max_rows": 1}).encode().replace(b"1}", b"1" * n + b"}"),
                  st.sampled_from(["SELECT 1", "SELECT 'infinity'::DOUBLE AS x"]), st.integers(1, 5000)),
        st.builds(lambda head, tail: head + tail, documents, st.binary(max_size=8)))
    bodies = st.one_of(st.binary(max_size=300), documents, shaped)
    statuses: dict[int, int] = {}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(body=bodies, path=st.sampled_from(POSTS), key=st.sampled_from([ADMIN, ADMIN, None]))
    def post(body: bytes, path: str, key: str | None) -> None:
        headers = {"Content-Type": "application/json", **({"X-API-Key": key} if key else {})}
        response = client.post(path, content=body, headers=headers)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, (path, body[:100], response.text[:300])
        assert key is not None or response.status_code == 401
        strict_json(response.content)

    post()
    assert len(statuses) > 2, statuses


def sql_values() -> Any:
    """DuckDB expressions of every kind of value a result can hold, extremes included."""
    from hypothesis import strategies as st

    years = st.integers(-290_000, 294_000).filter(lambda y: y != 0)
    dates = st.builds(lambda y, m, d: f"DATE '{abs(y):04d}-{m:02d}-{d:02d}{' (BC)' if y < 0 else ''}'",
                      years, st.integers(1, 12), st.integers(1, 28))
    clocks = st.builds(lambda h, m, s, us: f"{h:02d}:{m:02d}:{s:02d}.{us:06d}", st.integers(0, 23),
                       st.integers(0, 59), st.integers(0, 59), st.integers(0, 999_999))
    timestamps = st.builds(lambda d, c, kind: f"CAST({d[:-1]} {c}' AS {kind})".replace("DATE ", ""),
                           dates, clocks, st.sampled_from(["TIMESTAMP", "TIMESTAMPTZ", "TIMESTAMP_S",
                                                           "TIMESTAMP_MS"]))
    specials = st.sampled_from(["'infinity'::DOUBLE", "'-infinity'::DOUBLE", "'nan'::DOUBLE", "'infinity'::DATE",
                                "'-infinity'::TIMESTAMP", "'infinity'::TIMESTAMPTZ", "NULL", "'nan'::FLOAT",
                                "gen_random_uuid()", "TIME '24:00:00'", "INTERVAL 9999 YEARS", "'\\x00\\xff'::BLOB"])
    numbers = st.one_of(st.integers(-(10**38) + 1, 10**38 - 1).map(lambda n: f"{n}::HUGEINT"),
                        st.floats().map(lambda x: f"'{x!r}'::DOUBLE"),
                        st.decimals(allow_nan=False, allow_infinity=False, places=6)
                        .filter(lambda d: abs(d) < 10**30).map(lambda d: f"CAST('{d}' AS DECIMAL(38, 6))"))
    texts = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=20).map(
        lambda t: "'" + t.replace("'", "''") + "'")
    scalars = st.one_of(dates, timestamps, specials, numbers, texts, clocks.map(lambda c: f"TIME '{c}'"))
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3).map(lambda xs: f"[{', '.join(xs)}]"),
        st.lists(inner, min_size=1, max_size=3).map(
            lambda xs: "{" + ", ".join(f"'f{i}': {x}" for i, x in enumerate(xs)) + "}")), max_leaves=6)


@pytest.mark.slow
def test_any_sql_value_answers_valid_json_or_a_4xx(client: Client) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    statuses: dict[int, int] = {}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(expressions=st.lists(sql_values(), min_size=1, max_size=4))
    def query(expressions: list[str]) -> None:
        select = ", ".join(f"{e} AS c{i}" for i, e in enumerate(expressions))
        response = client.post("/v1/sql", json={"query": f"SELECT {select}"}, headers={"X-API-Key": ADMIN})
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code in (200, 400), (select, response.text[:300])
        if response.status_code == 200:
            assert len(strict_json(response.content)["rows"][0]) == len(expressions)

    query()
    assert statuses.get(200, 0) > FUZZ_EXAMPLES // 4, statuses  # many are values DuckDB accepts (a list
    # of mixed types is not)


# ------------------------------------------------------------------ item 10: DuckDB
REFUSED = [
    ("SELECT * FROM duckdb_settings()", "duckdb_settings"),
    ("SELECT current_setting('temp_directory') AS t", "current_setting"),
    ("SELECT CURRENT_SETTING('temp_directory') AS t", "current_setting"),
    ("SELECT 'temp_directory'.current_setting() AS t", "current_setting"),
    ("SELECT main.current_setting('temp_directory') AS t", "current_setting"),
    ("SELECT * FROM duckdb_databases()", "duckdb_databases"),
    ("SELECT * FROM duckdb_databases", "duckdb_databases"),
    ("SELECT * FROM pragma_database_list", "pragma_database_list"),
    ("SELECT * FROM pg_catalog.pg_settings", "pg_settings"),
    ("SELECT * FROM pg_settings", "pg_settings"),
    ("SELECT * FROM duckdb_extensions()", "duckdb_extensions"),
    ("SELECT * FROM duckdb_temporary_files()", "duckdb_temporary_files"),
    ("SELECT * FROM duckdb_secrets()", "duckdb_secrets"),
    ("SELECT * FROM which_secret('s3://x/y', 's3')", "which_secret"),
    ("SELECT * FROM pragma_version()", "pragma_version"),
    ("SELECT * FROM pragma_platform()", "pragma_platform"),
    ("SELECT getvariable('x') AS v", "getvariable"),
    ("SELECT * FROM query('SELECT 1')", "query"),
    ("SELECT * FROM json_execute_serialized_sql(json_serialize_sql('SELECT 1'))", "json_execute_serialized_sql"),
    ("SELECT * FROM read_text('.tmp/secret.txt')", "read_text"),
    ("SELECT * FROM read_blob('.tmp/secret.txt')", "read_blob"),
    ("SELECT * FROM glob('.tmp/*')", "glob"),
    ("SELECT * FROM \"glob\"('.tmp/*')", "glob"),
    ("SELECT * FROM read_csv_auto('.tmp/secret.txt')", "read_csv_auto"),
    ("SELECT * FROM read_json('.tmp/x.json')", "read_json"),
    ("SELECT * FROM read_parquet('.tmp/x.parquet')", "read_parquet"),
    ("SELECT * FROM parquet_metadata('.tmp/x.parquet')", "parquet_metadata"),
    ("SELECT * FROM sniff_csv('.tmp/secret.txt')", "sniff_csv"),
    ("SELECT * FROM '.tmp/secret.txt'", ".tmp/secret.txt"),
    ("FROM duckdb_settings()", "duckdb_settings"),
    ("WITH s AS (SELECT * FROM duckdb_settings()) SELECT * FROM s", "duckdb_settings"),
    ("SELECT (SELECT value FROM duckdb_settings() WHERE name = 'temp_directory') AS t", "duckdb_settings"),
    ("SELECT * FROM range(1) r, LATERAL (SELECT current_setting('temp_directory')) x", "current_setting"),
    ("SELECT [current_setting('temp_directory') for x in [1]] AS t", "current_setting"),
    ("SELECT 1 AS one WHERE EXISTS (SELECT * FROM glob('.tmp/*'))", "glob"),
    ("SELECT * FROM range(3) UNION ALL SELECT 1 FROM duckdb_databases()", "duckdb_databases"),
]


@pytest.mark.parametrize(("query", "name"), REFUSED, ids=[q for q, _ in REFUSED])
def test_catalog_settings_and_file_functions_are_refused(engine: DuckEngine, client: Client,
                                                         query: str, name: str) -> None:
    os.makedirs(".tmp", exist_ok=True)  # DuckDB's default temp directory, in the working directory
    Path(".tmp/secret.txt").write_text("a secret\n")
    with pytest.raises(SqlError, match="not allowed") as refused:
        engine.query(query)
    assert name in str(refused.value)
    response = client.post("/v1/sql", json={"query": query}, headers={"X-API-Key": ADMIN})
    assert response.status_code == 400 and name in response.json()["detail"]


@pytest.mark.parametrize("query", [
    "SELECT * FROM range(3)", "SELECT * FROM generate_series(1, 3)", "SELECT * FROM unnest([1, 2, 3])",
    "SELECT count(*) AS n FROM merged.user_all", "SELECT table_schema, table_name FROM information_schema.tables",
    "WITH t AS (SELECT 1 AS a) SELECT * FROM t", "SELECT version() AS v, now() AS t, current_date AS d",
    "SELECT * FROM speed.user_all_states", "SELECT * FROM serving.snapshot",
])
def test_ordinary_queries_still_answer(engine: DuckEngine, query: str) -> None:
    engine.query(query)


def test_the_temp_directory_is_private_and_removed_on_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "secret.txt").write_text("a secret\n")
    engine = DuckEngine(SPEC, Lakehouse(str(tmp_path / "delta")), store=None)
    engine.refresh()
    # below the query check: the connection itself, as a query that slipped through would run
    raw = engine._db.cursor()
    temp = Path(raw.execute("SELECT current_setting('temp_directory')").fetchall()[0][0])
    assert temp.is_absolute() and temp.is_dir()
    assert not temp.resolve().is_relative_to(tmp_path.resolve())
    assert not temp.resolve().is_relative_to(Path.cwd().resolve())
    import duckdb

    with pytest.raises(duckdb.PermissionException):
        raw.execute("SELECT * FROM read_text('.tmp/secret.txt')").fetchall()
    with pytest.raises(duckdb.PermissionException):
        raw.execute(f"SELECT * FROM read_text('{tmp_path}/.tmp/secret.txt')").fetchall()
    raw.close()
    engine.close()
    assert not temp.exists()


# ------------------------------------------------------------------ item 10: Spark SQL
@pytest.fixture(scope="module")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A bare local Spark session: the checks need Spark's parser and analyzer, no jars."""
    from pyspark.sql import SparkSession

    running = SparkSession.getActiveSession()  # the whole suite's session, when it runs first
    if running is not None:
        yield running
        return
    session = (SparkSession.builder.master("local[1]").appName("serving-hardening")
               .config("spark.ui.enabled", "false").config("spark.driver.memory", "512m")
               .config("spark.sql.warehouse.dir", str(tmp_path_factory.mktemp("warehouse")))
               .getOrCreate())
    yield session
    session.stop()


@pytest.fixture()
def spark_engine(spark: Any, tmp_path: Path) -> Any:
    from serving.spark_sql import SparkEngine

    return SparkEngine(spark, SPEC, Lakehouse(str(tmp_path / "delta")), store=None)


SPARK_REFUSED = [
    ("SELECT reflect('java.lang.System', 'getProperty', 'user.home') AS h", "reflect"),
    ("SELECT REFLECT('java.lang.System', 'getProperty', 'user.home') AS h", "reflect"),
    ("SELECT `reflect`('java.lang.System', 'getProperty', 'user.home') AS h", "reflect"),
    ("SELECT java_method('java.lang.System', 'getProperty', 'user.home') AS h", "reflect"),
    ("SELECT try_reflect('java.lang.System', 'getProperty', 'user.home') AS h", "reflect"),
    ("SELECT IDENTIFIER('ref' || 'lect')('java.lang.System', 'getProperty', 'user.home') AS h", "reflect"),
    ("WITH c AS (SELECT reflect('java.lang.System', 'getProperty', 'user.home') AS h) SELECT * FROM c", "reflect"),
    ("SELECT (SELECT java_method('java.lang.System', 'getProperty', 'user.home')) AS h", "reflect"),
    ("SELECT id FROM range(1) WHERE EXISTS (SELECT reflect('java.lang.System', 'getProperty', 'x'))", "reflect"),
    ("SELECT TRANSFORM(id) USING 'cat' AS (x) FROM range(1)", "TRANSFORM"),
    ("SELECT * FROM (SELECT TRANSFORM(1) USING 'cat' AS (x)) t", "TRANSFORM"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("query", "name"), SPARK_REFUSED, ids=[q for q, _ in SPARK_REFUSED])
def test_spark_refuses_reflection_and_script_transforms(spark_engine: Any, query: str, name: str) -> None:
    with pytest.raises(SqlError, match="not allowed") as refused:
        spark_engine.query(query)
    assert name in str(refused.value)


@pytest.mark.slow
def test_spark_reads_no_file_and_substitutes_no_variable(spark: Any, spark_engine: Any) -> None:
    spark.conf.set("spark.sql.runSQLOnFiles", "true")  # Spark's default, before any register()
    with pytest.raises(SqlError):
        spark_engine.query("SELECT * FROM text.`/etc/hostname`")
    assert spark.conf.get("spark.sql.runSQLOnFiles") == "true"  # the session's own setting, kept
    # `${env:...}` and `${spark...}` would otherwise be replaced in the query text by the parser
    table, _ = spark_engine.query("SELECT '${env:HOME}' AS home, '${spark.sql.warehouse.dir}' AS w")
    assert table.to_pylist() == [{"home": "${env:HOME}", "w": "${spark.sql.warehouse.dir}"}]
    table, truncated = spark_engine.query("SELECT id FROM range(5)", row_cap=3)
    assert table.column("id").to_pylist() == [0, 1, 2] and truncated


@pytest.mark.slow
def test_spark_register_restores_run_sql_on_files_when_it_fails(spark: Any, spark_engine: Any) -> None:
    spark.conf.set("spark.sql.runSQLOnFiles", "false")

    def fails_part_way() -> Any:
        assert spark.conf.get("spark.sql.runSQLOnFiles") == "true"  # on while it registers
        raise RuntimeError("a Delta table could not be read")

    spark_engine._register = fails_part_way  # whatever fails inside, the setting is restored
    with pytest.raises(RuntimeError, match="could not be read"):
        spark_engine.register()
    assert spark.conf.get("spark.sql.runSQLOnFiles") == "false"
