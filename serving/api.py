"""The HTTP API: predictions, merged features and read-only SQL (FastAPI, served by uvicorn).

    POST /v1/predict                         one event → score, model version, features used,
                                             the batch run/boundary/coverage, latency
    POST /v1/predict/batch                   {"events": [...]} → one answer per event
    GET  /v1/entities/{entity}/{id}/features merged.<view> rows of one entity, now
    POST /v1/sql                             {"query": "SELECT ..."} → JSON or Arrow IPC
    GET  /healthz /readyz /metrics /docs /openapi.json

Scores come from the speed layer's Ray Serve deployment (app `model`, or `model-challenger`
for the challenger's share of a rollout) through deployment handles: one model path (see
DESIGN.md invariant 3). An event's features are computed exactly as the speed layer computes
them: the merged monoid states of its entities over its windows (`DuckEngine.entity_states`)
and the spec's model inputs. Nothing here adds the event to any state: /predict asks "what
would this event score now", the Kafka topic is where events are recorded.

Every route under /v1 needs an API key (header X-API-Key) with the route's scope; every
request is logged to `lambdalake.audit` (caller name, route, status, model version, never
the key). Bad input gets a 4xx with a reason: 400 malformed JSON or bad SQL, 401/403 keys,
404 unknown entity kind, 408 SQL timeout, 413 body too large, 422 an invalid event.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, Field

from lakehouse.errors import ValidationError
from lakehouse.spec import PlatformSpec
from serving.auth import HEADER, ApiKeys, Caller
from serving.duck import DuckEngine, SqlError, SqlTimeout
from serving.rollout import CHAMPION, Rollout

log = logging.getLogger("lambdalake.serving")
audit = logging.getLogger("lambdalake.audit")

ARROW_STREAM = "application/vnd.apache.arrow.stream"


@dataclass
class ServingConfig:
    max_body_bytes: int = 1_048_576
    max_batch: int = 1000
    sql_row_cap: int = 10_000
    sql_timeout_s: float = 10.0
    refresh_s: float = 1.0

    @classmethod
    def from_settings(cls, settings: Any) -> ServingConfig:
        return cls(max_body_bytes=settings.api_max_body_bytes, max_batch=settings.api_max_batch,
                   sql_row_cap=settings.sql_row_cap, sql_timeout_s=settings.sql_timeout_s,
                   refresh_s=settings.serving_refresh_s)


@dataclass
class Serving:
    """Everything a request needs."""

    spec: PlatformSpec
    engine: DuckEngine
    rollout: Rollout
    keys: ApiKeys
    config: ServingConfig = field(default_factory=ServingConfig)
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


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) more than `limit` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the body is {declared} bytes; at most {limit} are accepted")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def jsonable(value: Any) -> Any:
    """A SQL value as JSON: exact integers stay integers, times become ISO-8601."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


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
        last_discovery = 0.0
        while not stop.wait(config.refresh_s):
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
        # in-memory lookups (~0.2 ms each): one hop off the event loop for the whole request
        looked_up = await asyncio.to_thread(lambda: [engine.entity_states(e) for e in events])
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
    async def predict(request: Request, caller: Caller = Depends(needs("predict"))) -> dict[str, Any]:
        body = await read_body(request, config.max_body_bytes)
        return (await predict_events(request, [parse_event(body)]))[0]

    batch_body = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["events"], "additionalProperties": False,
        "properties": {"events": {"type": "array", "minItems": 1, "maxItems": config.max_batch,
                                  "items": event_schema(spec)}}}}}}}

    @app.post("/v1/predict/batch", openapi_extra=batch_body, tags=["predict"],
              summary="Score many events")
    async def predict_batch(request: Request, caller: Caller = Depends(needs("predict"))) -> dict[str, Any]:
        body = await read_body(request, config.max_body_bytes)
        try:
            document = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HTTPException(400, f"the body is not JSON: {exc}") from None
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
                       caller: Caller = Depends(needs("features"))) -> dict[str, Any]:
        if entity not in entities:
            raise HTTPException(404, f"no feature view aggregates over {entity!r}; entities: {entities}")
        request.state.entity = entity_id
        views = await asyncio.to_thread(engine.entity_features, entity, entity_id)
        known = any(views.values())
        out = {}
        for name, row in views.items():
            view = spec.view(name)
            out[name] = jsonable(row) if row else {n: a.zero for n, a in view.aggregations.items()}
        return {"entity": entity, "id": entity_id, "known": known,
                "defaults": [n for n, row in views.items() if not row], "views": out,
                **engine.snapshot.to_json()}

    @app.post("/v1/sql", tags=["sql"], summary="A read-only SELECT over the merged views and tables",
              responses={200: {"content": {ARROW_STREAM: {}}}})
    async def sql(body: SqlRequest, request: Request, caller: Caller = Depends(needs("sql"))) -> Response:
        import pyarrow as pa

        cap = min(body.max_rows or config.sql_row_cap, config.sql_row_cap)
        try:
            result = await asyncio.to_thread(engine.query, body.query, row_cap=cap,
                                             timeout_s=config.sql_timeout_s)
        except SqlTimeout as exc:
            raise HTTPException(408, str(exc)) from None
        except SqlError as exc:
            raise HTTPException(400, str(exc)) from None
        wants_arrow = body.format == "arrow" or ARROW_STREAM in request.headers.get("accept", "")
        headers = {"X-Row-Count": str(result.table.num_rows), "X-Truncated": str(result.truncated).lower()}
        if wants_arrow:
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, result.table.schema) as writer:
                writer.write_table(result.table)
            return Response(sink.getvalue().to_pybytes(), media_type=ARROW_STREAM, headers=headers)
        rows = [jsonable(r) for r in result.table.to_pylist()]
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
