"""The HTTP API: predictions, merged features and read-only SQL (FastAPI, served by uvicorn).

    POST /v1/predict                         one event → score, model version, features used,
                                             the batch run/boundary/coverage, latency
    POST /v1/predict/batch                   {"events": [...]} → one answer per event
    GET  /v1/entities/{entity}/{id}/features merged.<view> rows of one entity, now
    POST /v1/sql                             {"query": "SELECT ..."} → JSON or Arrow IPC
    GET  /healthz /readyz /metrics /docs /openapi.json

Scores come from the speed layer's Ray Serve deployment (app `model`, or `model-challenger`
for the challenger's share of a rollout) through deployment handles: one model path (see
docs/architecture.md, invariant 3). An event's features are computed exactly as the speed layer computes
them: the merged monoid states of its entities over its windows (`DuckEngine.entity_states`)
and the spec's model inputs. Nothing here adds the event to any state: /predict asks "what
would this event score now", the Kafka topic is where events are recorded.

Every route under /v1 needs an API key (header X-API-Key) with the route's scope; every
request is logged to `lambdalake.audit` (caller name, route, status, model version, never
the key). Bad input gets a 4xx with a reason: 400 malformed JSON or bad SQL, 401/403 keys,
404 unknown entity kind, 408 SQL timeout, 413 body too large, 422 an invalid event or SQL
request. `RequestGuard` answers 401 before one byte of a body is read and 413 before a body
over `max_body_bytes` is parsed; bodies are decoded by `lakehouse.safejson` (no nesting,
number length or encoding can raise anything but a 4xx).

SQL answers in JSON hold JSON values only (see `jsonable`): infinities and NaN are null (the
Arrow format keeps them exactly), times are ISO-8601 text even where Python's `datetime`
cannot hold them (DuckDB's years beyond 9999 or before 1, its ±infinity dates).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date, datetime
from datetime import time as dt_time
from decimal import Decimal
from typing import Any

import pydantic
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lakehouse.config import Settings, options_from_settings, setting_field
from lakehouse.errors import ServiceError, SqlError, SqlTimeout, ValidationError
from lakehouse.registry import CHAMPION
from lakehouse.safejson import JsonLimits, JsonRefused, decode
from lakehouse.spec import PlatformSpec
from serving.auth import HEADER, ApiKeys, Caller
from serving.duck import DuckEngine
from serving.rollout import Rollout

log = logging.getLogger("lambdalake.serving")
audit = logging.getLogger("lambdalake.audit")

ARROW_STREAM = "application/vnd.apache.arrow.stream"


@dataclass
class ServingConfig:
    """The API's limits; every default is that of the setting named (`lakehouse.config`)."""

    max_body_bytes: int = setting_field("api_max_body_bytes")
    max_batch: int = setting_field("api_max_batch")
    sql_row_cap: int = setting_field("sql_row_cap")
    sql_timeout_s: float = setting_field("sql_timeout_s")
    refresh_s: float = setting_field("serving_refresh_s")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> ServingConfig:
        return options_from_settings(cls, settings, **overrides)


@dataclass
class Serving:
    """Everything a request needs."""

    spec: PlatformSpec
    engine: DuckEngine
    rollout: Rollout
    keys: ApiKeys
    config: ServingConfig  # `ServingConfig.from_settings(settings)` (serving.server)
    # called in the refresh thread every ~10 s: may add or drop rollout arms
    discover_arms: Callable[[], None] | None = None


class SqlRequest(BaseModel):
    query: str = Field(min_length=1, max_length=100_000, description="One SELECT statement.")
    format: str = Field(default="json", pattern="^(json|arrow)$",
                        description="json, or arrow for an Arrow IPC stream")
    max_rows: int | None = Field(default=None, ge=1, description="At most the server's row cap.")


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("lambdalake_api_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("lambdalake_api_request_seconds", "HTTP request latency",
                                 ["route"], registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10))
        self.predictions = Counter("lambdalake_api_predictions", "Events scored by /predict",
                                   ["alias", "model_version"], registry=self.registry)
        self.cache_hit_rate = Gauge("lambdalake_api_prediction_cache_hit_rate",
                                    "Share of cache lookups that hit", registry=self.registry)
        self.cache = Counter("lambdalake_api_prediction_cache_lookups", "Prediction cache lookups",
                             ["result"], registry=self.registry)
        self.increments = Gauge("lambdalake_api_speed_increments",
                                "Speed events above the batch boundary in the merged views",
                                registry=self.registry)
        self.snapshot_age = Gauge("lambdalake_api_snapshot_age_seconds",
                                  "Seconds since the merged views were last refreshed",
                                  registry=self.registry)


def _declared_length(headers: Headers) -> int | None:
    """The Content-Length, None when absent; HTTPException(400) when it is not a number."""
    declared = headers.get("content-length")
    if declared is None:
        return None
    if not (declared.isascii() and declared.isdigit()):  # "²".isdigit() is True
        raise HTTPException(400, f"Content-Length {declared[:40]!r} is not a number of bytes")
    return int(declared)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) more than `limit` bytes before reading them all."""
    declared = _declared_length(request.headers)
    if declared is not None and declared > limit:
        raise HTTPException(413, f"the body is {declared} bytes; at most {limit} are accepted")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class RequestGuard:
    """Pure ASGI middleware in front of every route under `prefix`, run before any route
    or body parsing: a request without a valid API key is answered 401 before one byte of
    its body is read, and a body over `limit` bytes 413, on its Content-Length or as soon as
    the streamed bytes pass it. Otherwise the body (at most `limit` bytes) is read here and
    handed on unchanged. Scopes stay the routes' business (their dependency answers 403).

    A refusal names the matched route in the ASGI scope, so metrics and the audit log count
    it under its route, and the caller's name (never the key) in the scope's state."""

    def __init__(self, app: ASGIApp, *, keys: ApiKeys, limit: int, routes: list[Any],
                 prefix: str = "/v1") -> None:
        self.app = app
        self.keys = keys
        self.limit = limit
        self.routes = routes
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == self.prefix or path.startswith(self.prefix + "/")):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        caller = self.keys.caller(headers.get(HEADER))
        if caller is None:
            await self._refuse(scope, receive, send, 401,
                               f"a valid API key is required in the {HEADER} header",
                               {"WWW-Authenticate": "ApiKey"})
            return
        scope.setdefault("state", {})["caller"] = caller.name
        try:
            declared = _declared_length(headers)
        except HTTPException as bad:
            await self._refuse(scope, receive, send, bad.status_code, str(bad.detail))
            return
        if declared is not None and declared > self.limit:
            await self._refuse(scope, receive, send, 413,
                               f"the body is {declared} bytes; at most {self.limit} are accepted")
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send, 413, f"the body exceeds {self.limit} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, detail: str,
                      headers: dict[str, str] | None = None) -> None:
        matched = [route for route in self.routes if route.matches(scope)[0] != Match.NONE]
        if matched:
            scope["route"] = matched[0]
        headers = dict(headers or {})
        framing = Headers(scope=scope)
        if framing.get("content-length", "0") != "0" or "transfer-encoding" in framing:
            headers["Connection"] = "close"  # the unread body must not be taken for a request
        await JSONResponse({"detail": detail}, status_code=status, headers=headers)(scope, receive, send)


_INT_TEXT_BITS = 13_000  # ~3,900 digits: below Python's int → str conversion limit (4,300)


def jsonable(value: Any) -> Any:
    """A SQL value as a JSON value, whatever it is (never raises):

    - integers stay integers (exact integral decimals too); other decimals become text;
    - NaN and ±infinity become null (JSON has none of them);
    - dates, times and timestamps become ISO-8601 text, `bytes` base64, intervals
      {"months", "days", "nanoseconds"}, maps lists of [key, value];
    - anything else becomes its text."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if value.bit_length() < _INT_TEXT_BITS else str(Decimal(value))
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        if not value.is_finite():
            return None
        if value == value.to_integral_value() and value.adjusted() < 3_900:
            return int(value)
        return str(value)
    if isinstance(value, datetime | date | dt_time):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {str(jsonable(k)): jsonable(v) for k, v in value.items()}
    names = getattr(value, "__match_args__", None) if isinstance(value, tuple) else None
    if names:  # a named tuple or struct sequence: pyarrow's MonthDayNano interval
        return {str(k): jsonable(v) for k, v in zip(names, value, strict=False)}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return str(value)


def json_rows(table: Any) -> list[dict[str, Any]]:
    """An Arrow table's rows as JSON objects (see `jsonable`), column by column. A column
    that Python cannot read at once (a date beyond year 9999, invalid UTF-8) is read value by
    value, and only the values Python cannot hold are written from their Arrow storage."""
    columns = []
    for column in table.columns:
        try:
            values = column.to_pylist()
        except (OverflowError, ValueError):
            values = [_python_value(scalar) for scalar in column]
        columns.append([jsonable(v) for v in values])
    if not columns:
        return [{} for _ in range(table.num_rows)]
    return [dict(zip(table.column_names, row, strict=True)) for row in zip(*columns, strict=True)]


_DATE_INFINITY = 2**31 - 1  # DuckDB's ±infinity dates (days) and timestamps, as Arrow holds them
_TIMESTAMP_INFINITY = 2**63 - 1
_UNITS_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def _python_value(scalar: Any) -> Any:
    """One Arrow value as Python, where `as_py` cannot make it (never raises)."""
    import pyarrow as pa

    try:
        return scalar.as_py()
    except (OverflowError, ValueError):
        pass
    kind = scalar.type
    try:
        if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
            return [_python_value(v) for v in scalar.values]
        if pa.types.is_map(kind):
            return [[_python_value(pair[0]), _python_value(pair[1])] for pair in scalar.values]
        if pa.types.is_struct(kind):
            return {kind.field(i).name: _python_value(scalar[i]) for i in range(kind.num_fields)}
        if pa.types.is_union(kind) or pa.types.is_dictionary(kind):
            return _python_value(scalar.value)
        if pa.types.is_date32(kind):
            days = scalar.cast(pa.int32()).as_py()
            return _infinite(days, _DATE_INFINITY) or _iso_date(days)
        if pa.types.is_date64(kind):
            return _iso_date(scalar.cast(pa.int64()).as_py() // 86_400_000)
        if pa.types.is_timestamp(kind):
            return _iso_timestamp(scalar.cast(pa.int64()).as_py(), kind.unit, kind.tz is not None)
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            return scalar.cast(pa.binary()).as_py().decode("utf-8", "replace")
    except (pa.ArrowException, OverflowError, ValueError):
        pass
    return None


def _infinite(raw: int, infinity: int) -> str | None:
    return "infinity" if raw == infinity else "-infinity" if raw == -infinity else None


def _iso_date(days: int) -> str:
    """Days since 1970-01-01 as ISO-8601 (proleptic Gregorian, astronomical years: year 0 is
    1 BC), for any number of days (Howard Hinnant's `civil_from_days`)."""
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (month <= 2)
    return f"{'-' if year < 0 else ''}{abs(year):04d}-{month:02d}-{day:02d}"


def _iso_timestamp(raw: int, unit: str, utc: bool) -> str:
    infinite = _infinite(raw, _TIMESTAMP_INFINITY)
    if infinite:
        return infinite
    per_second = _UNITS_PER_SECOND[unit]
    seconds, fraction = divmod(raw, per_second)
    days, second_of_day = divmod(seconds, 86_400)
    hours, rest = divmod(second_of_day, 3600)
    text = f"{_iso_date(days)}T{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
    if fraction:
        text += "." + str(fraction).rjust(len(str(per_second)) - 1, "0")
    return text + ("+00:00" if utc else "")  # a zoned timestamp is an instant: written in UTC


def event_schema(spec: PlatformSpec) -> dict[str, Any]:
    """JSON schema of an event, from the spec (documentation and fuzzing; the rules that
    decide are `RecordSchema.parse`'s)."""
    properties: dict[str, Any] = {}
    for f in spec.events.fields:
        if f.type == "string":
            prop: dict[str, Any] = {"type": "string"}
            if f.allowed:
                prop["enum"] = list(f.allowed)
            if f.max_length:
                prop["maxLength"] = f.max_length
        elif f.type == "timestamp":
            prop = {"type": "string", "format": "date-time"}
        elif f.type == "boolean":
            prop = {"type": "boolean"}
        else:
            prop = {"type": "integer" if f.type == "long" else "number"}
            if f.minimum is not None:
                prop["minimum"] = f.minimum
            if f.maximum is not None:
                prop["maximum"] = f.maximum
        if f.description:
            prop["description"] = f.description
        properties[f.name] = prop
    return {"type": "object", "properties": properties, "additionalProperties": False,
            "required": [f.name for f in spec.events.fields if f.required]}


def create_app(serving: Serving) -> FastAPI:
    spec, engine, rollout, config = serving.spec, serving.engine, serving.rollout, serving.config
    metrics = _Metrics()
    stop = threading.Event()
    entities = sorted({v.entity for v in spec.views})

    def refresh_loop() -> None:
        """A refresh every `refresh_s`, start to start (one taking longer is followed at once):
        the views are never staler than the interval plus one refresh."""
        last_discovery = 0.0
        due = time.monotonic() + config.refresh_s
        while not stop.wait(max(0.0, due - time.monotonic())):
            due = max(due + config.refresh_s, time.monotonic())
            try:
                snapshot = engine.refresh()
                metrics.increments.set(snapshot.increments)
                if serving.discover_arms is not None and time.monotonic() - last_discovery > 10:
                    last_discovery = time.monotonic()
                    serving.discover_arms()
            except Exception as exc:  # noqa: BLE001 - keep serving the last snapshot
                log.error(json.dumps({"event": "refresh_failed", "error": f"{type(exc).__name__}: {exc}"}))

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        await asyncio.to_thread(engine.refresh)
        thread = threading.Thread(target=refresh_loop, name="serving-refresh", daemon=True)
        thread.start()
        yield
        stop.set()
        thread.join(timeout=5)

    app = FastAPI(title="lambdalake", version="1",
                  description="Exact merged views (batch ⊕ speed), read-only SQL and model predictions.",
                  lifespan=lifespan)
    key_header = APIKeyHeader(name=HEADER, auto_error=False,
                              description="An API key; its scopes name the routes it may call.")
    # added before `observe`, so inside it: its refusals are counted and audited too
    app.add_middleware(RequestGuard, keys=serving.keys, limit=config.max_body_bytes, routes=app.router.routes)
    json_limits = JsonLimits(max_bytes=max(2, config.max_body_bytes))

    def decode_body(raw: bytes) -> Any:
        """The body as JSON; 413 when too large, 400 with the rule it breaks otherwise."""
        try:
            return decode(raw, json_limits)
        except JsonRefused as refused:
            raise HTTPException(413 if refused.rule == "too_large" else 400,
                                f"the body is not acceptable JSON: {refused}") from None

    def needs(scope: str) -> Callable[..., Awaitable[Caller]]:
        async def check(request: Request, key: str | None = Depends(key_header)) -> Caller:
            caller = serving.keys.caller(key)
            if caller is None:
                raise HTTPException(401, f"a valid API key is required in the {HEADER} header",
                                    headers={"WWW-Authenticate": "ApiKey"})
            request.state.caller = caller.name
            if scope not in caller.scopes:
                raise HTTPException(403, f"key {caller.name!r} lacks the {scope!r} scope")
            return caller
        return check

    # the dependency of each scope, built once (not in every route's signature)
    predict_caller = Depends(needs("predict"))
    features_caller = Depends(needs("features"))
    sql_caller = Depends(needs("sql"))

    @app.middleware("http")
    async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as exc:  # noqa: BLE001 - a bug must still answer, and be logged
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            response = JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)
        elapsed = time.perf_counter() - started
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(path, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(elapsed)
        if path.startswith("/v1"):
            audit.info(json.dumps({
                "caller": getattr(request.state, "caller", None), "method": request.method,
                "route": path, "status": response.status_code,
                "model_version": getattr(request.state, "model_version", None),
                "entity": getattr(request.state, "entity", None),
                "ms": round(elapsed * 1000, 2)}))
        return response

    def parse_event(raw: bytes, where: str = "the body") -> dict[str, Any]:
        try:
            return spec.events.parse(raw)
        except ValidationError as invalid:
            raise HTTPException(422, {"error": f"{where} is not a valid {spec.events.name}",
                                      "reasons": invalid.reasons}) from None

    async def predict_events(request: Request, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        started = time.perf_counter()
        # the gold index and one store round trip per event: one hop off the event loop for the
        # whole request. Without the store there is no exact answer: 503, never features that
        # differ from the speed layer's (see docs/architecture.md)
        try:
            looked_up = await asyncio.to_thread(lambda: [engine.entity_states(e) for e in events])
        except ServiceError as down:
            raise HTTPException(503, f"the online store cannot be read now: {down}") from None
        key_field = spec.events.key_field
        by_alias: dict[str, list[int]] = {}
        vectors = []
        for i, (event, found) in enumerate(zip(events, looked_up, strict=True)):
            vectors.append(spec.features(found.states, event))
            by_alias.setdefault(rollout.alias_for(str(event[key_field])), []).append(i)
        answers: list[dict[str, Any]] = [{} for _ in events]
        for alias, indices in by_alias.items():
            try:
                scored = await rollout.score(alias, [vectors[i] for i in indices])
            except Exception as exc:  # noqa: BLE001 - the model service is down or failing
                raise HTTPException(503, f"the model service ({alias}) did not answer: "
                                         f"{type(exc).__name__}") from None
            metrics.predictions.labels(alias, str(scored.version)).inc(len(indices))
            for i, score, cached in zip(indices, scored.scores, scored.cached, strict=True):
                metrics.cache.labels("hit" if cached else "miss").inc()
                answers[i] = {"score": score, "model_version": scored.version, "model_alias": alias,
                              "cached": cached}
        metrics.cache_hit_rate.set(rollout.cache.hit_rate)
        latency = (time.perf_counter() - started) * 1000
        out = []
        for event, found, vector, answer in zip(events, looked_up, vectors, answers, strict=True):
            out.append({"event_id": event[spec.events.id_field], **answer,
                        "features": dict(zip(spec.feature_names, vector, strict=True)),
                        "defaults_used_for": found.unknown, **found.snapshot,
                        "latency_ms": round(latency, 3)})
        request.state.model_version = sorted({a["model_version"] for a in answers})
        request.state.entity = events[0][key_field] if len(events) == 1 else f"{len(events)} events"
        return out

    event_body = {"requestBody": {"required": True,
                                  "content": {"application/json": {"schema": event_schema(spec)}}}}

    @app.post("/v1/predict", openapi_extra=event_body, tags=["predict"],
              summary="Score one event with the merged features it would see now")
    async def predict(request: Request, caller: Caller = predict_caller) -> dict[str, Any]:
        body = await read_body(request, config.max_body_bytes)
        return (await predict_events(request, [parse_event(body)]))[0]

    batch_body = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["events"], "additionalProperties": False,
        "properties": {"events": {"type": "array", "minItems": 1, "maxItems": config.max_batch,
                                  "items": event_schema(spec)}}}}}}}

    @app.post("/v1/predict/batch", openapi_extra=batch_body, tags=["predict"],
              summary="Score many events")
    async def predict_batch(request: Request, caller: Caller = predict_caller) -> dict[str, Any]:
        document = decode_body(await read_body(request, config.max_body_bytes))
        items = document.get("events") if isinstance(document, dict) else None
        if not isinstance(items, list) or not items:
            raise HTTPException(422, "expected {\"events\": [event, ...]} with at least one event")
        if len(items) > config.max_batch:
            raise HTTPException(413, f"{len(items)} events; at most {config.max_batch} per request")
        events, problems = [], []
        for i, item in enumerate(items):
            try:
                events.append(spec.events.parse(json.dumps(item)))
            except ValidationError as invalid:
                problems.append({"index": i, "reasons": invalid.reasons})
        if problems:
            raise HTTPException(422, {"error": "invalid events; nothing was scored", "invalid": problems})
        return {"predictions": await predict_events(request, events)}

    @app.get("/v1/entities/{entity}/{entity_id}/features", tags=["features"],
             summary="Merged features of one entity now (batch view ⊕ speed increments)")
    async def features(entity: str, entity_id: str, request: Request,
                       caller: Caller = features_caller) -> dict[str, Any]:
        if entity not in entities:
            raise HTTPException(404, f"no feature view aggregates over {entity!r}; entities: {entities}")
        request.state.entity = entity_id
        try:
            found = await asyncio.to_thread(engine.entity_features, entity, entity_id)
        except ServiceError as down:
            raise HTTPException(503, f"the online store cannot be read now: {down}") from None
        views = found.views
        known = any(views.values())
        out = {}
        for name, row in views.items():
            view = spec.view(name)
            out[name] = jsonable(row) if row else {n: a.zero for n, a in view.aggregations.items()}
        return {"entity": entity, "id": entity_id, "known": known,
                "defaults": [n for n, row in views.items() if not row], "views": out,
                **found.snapshot}

    sql_body = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": SqlRequest.model_json_schema()}}}}

    @app.post("/v1/sql", openapi_extra=sql_body, tags=["sql"],
              summary="A read-only SELECT over the merged views and tables",
              responses={200: {"content": {ARROW_STREAM: {}}}})
    async def sql(request: Request, caller: Caller = sql_caller) -> Response:
        import pyarrow as pa

        # read and validated here, after the key and size checks, not by FastAPI before them
        document = decode_body(await read_body(request, config.max_body_bytes))
        try:
            body = SqlRequest.model_validate(document)
        except pydantic.ValidationError as invalid:
            raise HTTPException(422, [{**error, "loc": ["body", *error["loc"]]} for error in invalid.errors(
                include_url=False, include_context=False, include_input=False)]) from None
        cap = min(body.max_rows or config.sql_row_cap, config.sql_row_cap)
        try:
            result = await asyncio.to_thread(engine.query, body.query, row_cap=cap,
                                             timeout_s=config.sql_timeout_s)
        except SqlTimeout as exc:
            raise HTTPException(408, str(exc)) from None
        except SqlError as exc:
            raise HTTPException(400, str(exc)) from None
        except ServiceError as down:  # a raw table the query names cannot be read now
            raise HTTPException(503, str(down)) from None
        wants_arrow = body.format == "arrow" or ARROW_STREAM in request.headers.get("accept", "")
        headers = {"X-Row-Count": str(result.table.num_rows), "X-Truncated": str(result.truncated).lower()}
        if wants_arrow:
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, result.table.schema) as writer:
                writer.write_table(result.table)
            return Response(sink.getvalue().to_pybytes(), media_type=ARROW_STREAM, headers=headers)
        rows = json_rows(result.table)
        return JSONResponse({
            "columns": [{"name": f.name, "type": str(f.type)} for f in result.table.schema],
            "rows": rows, "row_count": len(rows), "truncated": result.truncated,
            "elapsed_ms": round(result.elapsed_ms, 3), **engine.snapshot.to_json()}, headers=headers)

    @app.get("/healthz", tags=["operations"], summary="The process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], summary="Views loaded and the champion model answers")
    async def readyz() -> JSONResponse:
        problems = []
        if engine.snapshot.refreshed_at == 0:
            problems.append("the merged views were never loaded")
        if CHAMPION not in rollout.arms:
            problems.append("no champion model service")
        body = {"ready": not problems, "problems": problems, "arms": sorted(rollout.arms),
                "challenger_weight": rollout.challenger_weight, **engine.snapshot.to_json()}
        return JSONResponse(body, status_code=200 if not problems else 503)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        metrics.snapshot_age.set(max(0.0, time.time() - engine.snapshot.refreshed_at))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
