"""Serving-layer benchmark: /predict throughput and latency against a bare FastAPI endpoint
on the same server stack, and SQL over merged views at 1M entities.

    make up   # Kafka is not needed; MLflow and Ray Serve are
    .venv/bin/python -m tests.benchmarks.serving --entities 1000000 --speed-events 100000

What it does:
1. writes a synthetic lakehouse (delta-rs) in a temporary directory: a published batch run
   whose views hold `--entities` users (and 1,000 merchants), and `--speed-events` scored
   events above its boundary;
2. SQL on the embedded engine: point lookups of random users in merged.user_all (p50/p99),
   and full scans of the merged view (count and sums over every entity);
3. registers a random signed model as the champion of `bench-serving-*`, deploys it on Ray
   Serve, starts `lambdalake serve` on that lakehouse and a bare FastAPI app answering a
   fixed JSON object (both uvicorn, one process each), and drives each with 32 concurrent
   connections for `--seconds`: requests/s, p50, p99 and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from fastapi import FastAPI  # noqa: E402

bare_app = FastAPI()


@bare_app.post("/bare")
async def bare(body: dict[str, Any]) -> dict[str, Any]:
    """The baseline: parse a JSON body, answer a JSON object."""
    return {"score": 0.5, "model_version": 1, "event_id": body.get("event_id")}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def write_lakehouse(root: Path, entities: int, speed_events: int) -> Any:
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    from lakehouse import scored
    from lakehouse.fraud import FRAUD_SPEC
    from lakehouse.tables import Lakehouse
    from serving.duck import gold_schema
    from speed import lake

    lakehouse = Lakehouse(str(root))
    rng = random.Random(1)
    now_ms = 1_767_225_600_000
    users = [f"u{i:07d}" for i in range(entities)]
    versions = {}
    started = time.perf_counter()
    for view in FRAUD_SPEC.views:
        keys = [f"m{i:04d}" for i in range(1000)] if view.entity == "merchant_id" else users
        bucket = (now_ms - now_ms % view.bucket_ms) if view.bucket_ms else 0
        columns: dict[str, Any] = {view.entity: keys, "bucket_start_ms": [bucket] * len(keys)}
        for name, aggregation in view.aggregations.items():
            if aggregation.kind == "count":
                columns[name] = [rng.randint(1, 50) for _ in keys]
            elif aggregation.kind == "sum_sq":
                columns[name] = [10**10] * len(keys)
            else:
                columns[name] = [rng.randint(100, 100_000) for _ in keys]
        columns["batch_run_id"] = ["bench-run"] * len(keys)
        schema = gold_schema(FRAUD_SPEC, view)
        table = pa.table({f.name: pa.array(columns[f.name], type=f.type) for f in schema})
        write_deltalake(lakehouse.gold(view.name), table, mode="overwrite")
        versions[view.name] = DeltaTable(lakehouse.gold(view.name)).version()
    run = {"run_id": "bench-run", "boundary": [(p, 1_000_000) for p in range(4)],
           "view_versions": list(versions.items()), "source_versions": [], "row_counts": [],
           "durations_s": [], "spec_fingerprint": FRAUD_SPEC.fingerprint(),
           "finished_at": datetime.now(UTC)}
    runs_schema = pa.schema([
        ("run_id", pa.string()), ("boundary", pa.map_(pa.int32(), pa.int64())),
        ("view_versions", pa.map_(pa.string(), pa.int64())), ("source_versions", pa.map_(pa.string(), pa.int64())),
        ("row_counts", pa.map_(pa.string(), pa.int64())), ("durations_s", pa.map_(pa.string(), pa.float64())),
        ("spec_fingerprint", pa.string()), ("finished_at", pa.timestamp("us", tz="UTC"))])
    write_deltalake(lakehouse.batch_runs, pa.Table.from_pylist([run], schema=runs_schema), mode="append")
    schema = scored.scored_schema(FRAUD_SPEC)
    scored.ensure_scored_table(lakehouse, schema)
    per_batch = 10_000
    for start in range(0, speed_events, per_batch):
        rows, last = [], {}
        for i in range(start, min(speed_events, start + per_batch)):
            p = i % 4
            offset = 1_000_001 + i // 4
            last[p] = offset
            rows.append({"event_id": f"s{i}", "user_id": users[rng.randrange(entities)],
                         "merchant_id": f"m{rng.randrange(1000):04d}", "merchant_category": "grocery",
                         "amount": rng.randint(100, 50_000), "currency": "EUR", "country": "DE",
                         "channel": "pos", "event_time": (now_ms + i) * 1000, "partition": p,
                         "offset": offset, "kafka_timestamp": None, "features": [0.0], "score": 0.5,
                         "model_version": 1, "batch_run_id": "bench-run", "consumer_group": "bench",
                         "scored_at": datetime.now(UTC), "feature_ms": 0.0, "model_ms": 0.0})
        lake.append_scored(lakehouse, schema, rows, last, group="bench", topic=FRAUD_SPEC.events.topic)
    print(f"lakehouse: {entities:,} users, {speed_events:,} speed events written in "
          f"{time.perf_counter() - started:.1f}s", file=sys.stderr)
    return lakehouse, users


def sql_figures(lakehouse: Any, users: list[str]) -> None:
    from lakehouse.fraud import FRAUD_SPEC
    from serving.duck import DuckEngine

    engine = DuckEngine(FRAUD_SPEC, lakehouse, group="bench", partitions=4)
    started = time.perf_counter()
    snapshot = engine.refresh()
    print(f"refresh (load the run and {snapshot.increments:,} increments): {time.perf_counter() - started:.2f}s")
    rng = random.Random(2)
    lookups = []
    for _ in range(300):
        user = users[rng.randrange(len(users))]
        t = time.perf_counter()
        engine.query(f"SELECT * FROM merged.user_all WHERE user_id = '{user}'")
        lookups.append((time.perf_counter() - t) * 1000)
    print(f"SQL point lookup merged.user_all: p50 {percentile(lookups, .5):.2f} ms, "
          f"p99 {percentile(lookups, .99):.2f} ms (300 random users)")
    scans = []
    for _ in range(5):
        t = time.perf_counter()
        engine.query("SELECT count(*), sum(count), sum(amount_sum), avg(mean_amount) FROM merged.user_all")
        scans.append(time.perf_counter() - t)
    print(f"SQL full scan merged.user_all ({len(users):,} entities ⊕ {snapshot.increments:,} events): "
          f"median {statistics.median(scans):.2f}s, best {min(scans):.2f}s")
    t = time.perf_counter()
    engine.query("SELECT count(*) FROM merged.user_10m")
    print(f"SQL full scan merged.user_10m (window at stream time): {time.perf_counter() - t:.2f}s")
    engine.close()


async def drive(url: str, bodies: list[dict[str, Any]], headers: dict[str, str], seconds: float,
                concurrency: int = 32) -> tuple[float, list[float], Counter[int]]:
    import httpx

    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=60) as client:
        async def worker(n: int) -> None:
            i = n
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                response = await client.post(url, json=bodies[i % len(bodies)])
                latencies.append((time.perf_counter() - t) * 1000)
                statuses[response.status_code] += 1
                i += concurrency
        started = time.perf_counter()
        await asyncio.gather(*[worker(n) for n in range(concurrency)])
        elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, latencies, statuses


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} never became ready")


def http_figures(lakehouse: Any, users: list[str], seconds: float) -> None:
    from lakehouse.config import load_settings
    from lakehouse.serve import APP_NAME
    from lakehouse.spec import format_timestamp_ms
    from speed.model_service import ServiceArgs, serve_on_ray
    from tests.integration.models import publish, random_model

    key = "bench-key-" + uuid.uuid4().hex
    settings = load_settings(model_name=f"bench-serving-{uuid.uuid4().hex[:6]}")
    with tempfile.TemporaryDirectory() as bundles:
        publish(settings, random_model(3), Path(bundles))
    serve_on_ray(settings.ray_address, ServiceArgs.from_settings(settings, max_replicas=1))
    env = {**os.environ, "LAMBDALAKE_DELTA_ROOT": lakehouse.root, "LAMBDALAKE_SPEED_GROUP": "bench",
           "LAMBDALAKE_MODEL_NAME": settings.model_name, "LAMBDALAKE_API_KEYS": f"bench:{key}:predict",
           "LAMBDALAKE_PREDICTION_CACHE_SIZE": "0"}
    api_port, bare_port = settings.api_port + 100, settings.api_port + 101
    bin_dir = Path(sys.executable).parent
    api = subprocess.Popen([str(bin_dir / "lambdalake"), "serve", "--port", str(api_port)], env=env, cwd=REPO)
    bare_server = subprocess.Popen([sys.executable, "-m", "uvicorn", "tests.benchmarks.serving:bare_app",
                                    "--port", str(bare_port), "--log-level", "warning", "--no-access-log"],
                                   cwd=REPO)
    try:
        wait_ready(f"http://127.0.0.1:{api_port}/readyz", api)
        wait_ready(f"http://127.0.0.1:{bare_port}/docs", bare_server)
        rng = random.Random(3)
        bodies = [{"event_id": f"b{i}", "user_id": users[rng.randrange(len(users))],
                   "merchant_id": f"m{rng.randrange(1000):04d}", "merchant_category": "crypto",
                   "amount": round(rng.uniform(1, 500), 2), "currency": "EUR", "country": "DE",
                   "channel": "online", "event_time": format_timestamp_ms(1_767_225_700_000 + i)}
                  for i in range(5000)]
        headers = {"X-API-Key": key}
        asyncio.run(drive(f"http://127.0.0.1:{api_port}/v1/predict", bodies, headers, 3))  # warm-up
        rows = []
        for name, url in (("bare FastAPI", f"http://127.0.0.1:{bare_port}/bare"),
                          ("/v1/predict", f"http://127.0.0.1:{api_port}/v1/predict")):
            rps, latencies, statuses = asyncio.run(drive(url, bodies, headers, seconds))
            rows.append((name, rps, percentile(latencies, .5), percentile(latencies, .99), dict(statuses)))
        for name, rps, p50, p99, statuses in rows:
            print(f"{name:>14}: {rps:8.1f} req/s, p50 {p50:7.2f} ms, p99 {p99:7.2f} ms "
                  f"(32 connections, {seconds:g}s; statuses {statuses})")
        print(f"ratio /v1/predict ÷ bare: throughput {rows[1][1] / rows[0][1]:.3f}, "
              f"p50 latency ×{rows[1][2] / rows[0][2]:.1f}")
    finally:
        for process in (api, bare_server):
            process.terminate()
            process.wait(timeout=30)
        from ray import serve

        serve.delete(APP_NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=1_000_000)
    parser.add_argument("--speed-events", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--skip-http", action="store_true", help="SQL figures only (no services)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-serving-", dir=REPO / "var") as scratch:
        lakehouse, users = write_lakehouse(Path(scratch) / "delta", args.entities, args.speed_events)
        sql_figures(lakehouse, users)
        if not args.skip_http:
            from lakehouse.config import load_settings
            from lakehouse.serve import ray_local_env

            os.environ.update(ray_local_env())  # before Ray is imported: it reads them then
            import ray

            ray.init(address=load_settings().ray_address, log_to_driver=False)
            http_figures(lakehouse, users, args.seconds)


if __name__ == "__main__":
    main()
