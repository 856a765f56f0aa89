"""Serving-layer benchmark: refreshes of the merged views as the uptime since the batch run
grows (incremental, and a full reload for comparison), how soon a step is visible in SQL,
point reads, SQL over merged views at 1M entities, and /predict throughput and latency
against a bare FastAPI endpoint on the same server stack.

    make up   # Kafka is not needed; MLflow and Ray Serve are (the script starts its own redis-server)
    .venv/bin/python -m tests.benchmarks.serving --entities 1000000
    # the engine figures only (no services but the script's own redis-server), about 2 minutes:
    .venv/bin/python -m tests.benchmarks.serving --entities 100000 --active-users 1000 --skip-http

What it does:
1. starts a redis-server of its own (the platform's RedisService, on a free port) for the
   online store, and writes a synthetic lakehouse (delta-rs) in a temporary directory: a
   published batch run whose views hold `--entities` users (and 1,000 merchants) and which
   cut the store (the speed layer never stepped: the cuts are at the run's boundary);
2. the speed layer above the run: micro-batches of `--events-per-step` events of
   `--active-users` of those users (10 ms of event time apart), each one store step per
   partition (as `speed/` does), `--steps` of them in all;
3. refreshes of the embedded engine: the first (loads the run's gold views), one with
   nothing moved, then at each of `--at` micro-batches (100, 1,000 and 10,000 by default, or
   `--steps N`: N/100, N/10 and N; the live states grow with them, as with the uptime since
   a run; `--speed-events E` makes micro-batches of E/N events) the refresh after one
   more micro-batch, the engine having refreshed after the one before (what the API's
   refresh loop sees; the median of 5), and a full reload at the same moment (`refresh(full=
   True)`: every live state loaded again, which is what every refresh cost before the store
   recorded its changes), side by side, with the ratio of the last to the first (the goal:
   at most 1.2); the incremental refresh costs the pairs one micro-batch changed;
4. step → visible in SQL: with a refresh loop every `--refresh-s` (the API's
   `serving_refresh_s`), 40 probes, each a store step carrying the first event of a user no
   one has seen, timed until `merged.user_all` answers with that user (p50/p99); what a
   produce → SQL time adds to the speed layer's produce → step time;
5. point reads: SQL lookups of random users in merged.user_all, and the gold index ⊕ one
   store round trip that /v1/entities (`entity_features`) and /v1/predict
   (`entity_states`) read (p50/p99); full SQL scans of the merged views;
6. registers a random signed model as the champion of `bench-serving-*`, deploys it on Ray
   Serve, starts `lambdalake serve` on that lakehouse and store and a bare FastAPI app
   answering a fixed JSON object (both uvicorn, one process each), and drives each with 32
   concurrent connections for `--seconds`: requests/s, p50, p99 and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
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


PARTITIONS = 4
FLOOR = 1_000_000  # the run's boundary in every partition: the speed layer's events come after it
NOW_MS = 1_767_225_600_000
GROUP = "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def online_store(url: str, lakehouse: Any) -> Any:
    """The store of the bench group over this lakehouse, named as `lambdalake serve` names it."""
    from lakehouse.config import load_settings
    from lakehouse.fraud import FRAUD_SPEC
    from lakehouse.online import open_store

    return open_store(load_settings(online_store_url=url), FRAUD_SPEC, group=GROUP, root=lakehouse.root)


def write_run(root: Path, url: str, entities: int) -> tuple[Any, list[str]]:
    """A published batch run of `entities` users that cut the store (never stepped: at FLOOR)."""
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    from lakehouse.fraud import FRAUD_SPEC
    from lakehouse.tables import BatchRun, Lakehouse, publish_run
    from serving.duck import gold_schema

    lakehouse = Lakehouse(str(root))
    rng = random.Random(1)
    now_ms = NOW_MS
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
    store = online_store(url, lakehouse)
    cuts = {p: store.cut(p, floor=FLOOR) for p in range(PARTITIONS)}  # as the views job does
    publish_run(lakehouse, BatchRun(
        run_id="bench-run", boundary={p: c.offset for p, c in cuts.items()},
        cut_epochs={p: c.epoch for p, c in cuts.items()}, view_versions=versions, source_versions={},
        row_counts={}, durations_s={}, spec_fingerprint=FRAUD_SPEC.fingerprint(), finished_at=datetime.now(UTC)))
    print(f"lakehouse: a run of {entities:,} users written and published in "
          f"{time.perf_counter() - started:.1f}s", file=sys.stderr)
    return lakehouse, users


class SpeedLayer:
    """The speed layer's micro-batches above the run: event j goes to partition j % 4 at offset
    FLOOR + 1 + j // 4; each micro-batch is one store step per partition."""

    def __init__(self, store: Any, users: list[str], per_step: int, steps: int, active_users: int) -> None:
        self.store = store
        self.steps = steps
        self.per_step = per_step
        rng = random.Random(4)
        self.active = rng.sample(users, min(active_users, len(users)))
        self.rng = rng
        self.done = 0
        self.seconds = 0.0

    def event(self, j: int) -> dict[str, Any]:
        rng = self.rng
        return {"event_id": f"s{j}", "user_id": self.active[rng.randrange(len(self.active))],
                "merchant_id": f"m{rng.randrange(1000):04d}", "merchant_category": "grocery",
                "amount": rng.randint(100, 50_000), "currency": "EUR", "country": "DE", "channel": "pos",
                "event_time": NOW_MS + j * 10}

    def run(self, through: int, probe: str | None = None) -> None:
        """Apply the micro-batches up to `through` (of `steps`); `probe`: the last one's first
        event is of that user."""
        from lakehouse.fraud import FRAUD_SPEC
        from lakehouse.online.base import Step, increments_of

        started = time.perf_counter()
        for i in range(self.done, through):
            batches: dict[int, list[tuple[int, dict[str, Any]]]] = {}
            for j in range(i * self.per_step, (i + 1) * self.per_step):
                event = self.event(j)
                if probe is not None and i == through - 1 and j == i * self.per_step:
                    event["user_id"] = probe
                batches.setdefault(j % PARTITIONS, []).append((FLOOR + 1 + j // PARTITIONS, event))
            for p, batch in batches.items():
                def above(applied: int, batch: list[tuple[int, dict[str, Any]]] = batch) -> Step:
                    return Step(increments_of(FRAUD_SPEC, [e for o, e in batch if o > applied]), {}, {})

                self.store.apply(p, batch[0][0], batch[-1][0], above)
        self.done = max(self.done, through)
        self.seconds += time.perf_counter() - started

    @property
    def events(self) -> int:
        return self.done * self.per_step


def _timed(call: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def _cpu_timed(call: Any) -> tuple[float, float, Any]:
    """(wall seconds, this process's CPU seconds, result): CPU time varies less than wall
    time on a loaded machine (redis-server's share is not in it)."""
    started, cpu = time.perf_counter(), time.process_time()
    result = call()
    return time.perf_counter() - started, time.process_time() - cpu, result


def refresh_figures(engine: Any, speed: SpeedLayer, at: list[int], users: list[str]) -> None:
    """The incremental refresh after one micro-batch and a full reload, at each of `at` steps."""
    from lakehouse.fraud import FRAUD_SPEC

    speed.run(at[0] - 5)
    seconds, snapshot = _timed(engine.refresh)
    gold_rows = sum(len(users) if v.entity == "user_id" else 1000 for v in FRAUD_SPEC.views)
    print(f"refresh, first (loads the run: {gold_rows:,} gold rows, and {snapshot.increments:,} live states "
          f"after {speed.done:,} steps): {seconds:.2f}s")
    seconds, again = _timed(engine.refresh)
    print(f"refresh, nothing moved: {seconds * 1000:.1f} ms "
          f"({'skipped' if again is snapshot else 'rebuilt: it should have been skipped'})")
    rows = []
    for steps in at:
        speed.run(steps - 5)
        engine.refresh()  # the refresh loop has caught up with the step before
        walls, cpus = [], []
        for done in range(steps - 4, steps + 1):
            speed.run(done)
            wall, cpu, snapshot = _cpu_timed(engine.refresh)
            walls.append(wall)
            cpus.append(cpu)
        speed.run(steps + 1)
        full, full_cpu, _ = _cpu_timed(lambda: engine.refresh(full=True))
        rows.append((steps, snapshot.increments, statistics.median(walls), statistics.median(cpus), full, full_cpu))
    print(f"refresh after one micro-batch of {speed.per_step} events ({len(speed.active):,} active users; "
          "incremental: the median of 5, the engine caught up with the step before), and a full reload "
          "(every live state, as each refresh did before) at the same moment; wall time (this process's CPU):")
    print(f"{'steps':>8} {'live states':>12} {'incremental':>22} {'full reload':>24}")
    for steps, states, wall, cpu, full, full_cpu in rows:
        print(f"{steps:>8,} {states:>12,} {wall * 1000:>8.1f} ms ({cpu * 1000:5.1f} ms) "
              f"{full * 1000:>9.1f} ms ({full_cpu * 1000:6.1f} ms)")
    first, last = rows[0], rows[-1]
    ratio, cpu_ratio = last[2] / first[2], last[3] / first[3]
    print(f"incremental refresh after {last[0]:,} ÷ after {first[0]:,} micro-batches: {ratio:.2f}× wall, "
          f"{cpu_ratio:.2f}× CPU ({'within' if min(ratio, cpu_ratio) <= 1.2 else 'ABOVE'} the goal of 1.2×); "
          f"the full reload: {last[4] / first[4]:.1f}×")
    print(f"speed layer: {speed.done:,} micro-batches ({speed.done * PARTITIONS:,} store steps) applied in "
          f"{speed.seconds:.1f}s", file=sys.stderr)


def visible_figures(engine: Any, speed: SpeedLayer, refresh_s: float, probes: int = 40) -> None:
    """Step → visible in SQL, with a refresh loop every `refresh_s` as the API runs one."""
    import threading

    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(refresh_s):
            engine.refresh()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    latencies, refreshes = [], []
    try:
        rng = random.Random(5)
        for i in range(probes):
            time.sleep(rng.uniform(0, refresh_s))  # a step lands anywhere in the refresh period
            user = f"probe-{uuid.uuid4().hex[:8]}-{i}"
            started = time.perf_counter()
            speed.run(speed.done + 1, probe=user)
            while not engine.query(f"SELECT 1 FROM merged.user_all WHERE user_id = '{user}'").table.num_rows:
                time.sleep(0.002)
            latencies.append(time.perf_counter() - started)
            refreshes.append(engine.snapshot.refreshed_at)
    finally:
        stop.set()
        thread.join(timeout=30)
    print(f"step → visible in SQL (merged.user_all), refreshing every {refresh_s:g}s, {probes} probes at "
          f"{speed.done:,} micro-batches: p50 {percentile(latencies, .5) * 1000:.0f} ms, "
          f"p99 {percentile(latencies, .99) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")


def engine_figures(lakehouse: Any, url: str, users: list[str], speed: SpeedLayer, at: list[int],
                   refresh_s: float) -> None:
    from lakehouse.fraud import FRAUD_SPEC
    from serving.duck import DuckEngine

    engine = DuckEngine(FRAUD_SPEC, lakehouse, store=online_store(url, lakehouse), partitions=PARTITIONS)
    refresh_figures(engine, speed, at, users)
    visible_figures(engine, speed, refresh_s)
    snapshot = engine.refresh()

    rng = random.Random(2)
    lookups, features, states = [], [], []
    for _ in range(300):
        user = speed.active[rng.randrange(len(speed.active))] if rng.random() < 0.5 else \
            users[rng.randrange(len(users))]
        t = time.perf_counter()
        engine.query(f"SELECT * FROM merged.user_all WHERE user_id = '{user}'")
        lookups.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        engine.entity_features("user_id", user)
        features.append((time.perf_counter() - t) * 1000)
        event = {**speed.event(0), "user_id": user, "event_time": NOW_MS + speed.events * 10}
        t = time.perf_counter()
        engine.entity_states(event)
        states.append((time.perf_counter() - t) * 1000)
    for name, values in (("SQL point lookup merged.user_all", lookups),
                         ("entity_features (/v1/entities: gold index ⊕ one store read)", features),
                         ("entity_states (/v1/predict: gold index ⊕ one store read)", states)):
        print(f"{name}: p50 {percentile(values, .5):.2f} ms, p99 {percentile(values, .99):.2f} ms "
              "(300 random users, half of them active)")
    scans = []
    for _ in range(5):
        t = time.perf_counter()
        engine.query("SELECT count(*), sum(count), sum(amount_sum), avg(mean_amount) FROM merged.user_all")
        scans.append(time.perf_counter() - t)
    print(f"SQL full scan merged.user_all ({len(users):,} entities ⊕ {snapshot.increments:,} live states): "
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


def http_figures(lakehouse: Any, store_url: str, users: list[str], seconds: float) -> None:
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
    env = {**os.environ, "LAMBDALAKE_DELTA_ROOT": lakehouse.root, "LAMBDALAKE_SPEED_GROUP": GROUP,
           "LAMBDALAKE_ONLINE_STORE_URL": store_url, "LAMBDALAKE_KAFKA_PARTITIONS": str(PARTITIONS),
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
        for name, rps, p50, p99, counts in rows:
            print(f"{name:>14}: {rps:8.1f} req/s, p50 {p50:7.2f} ms, p99 {p99:7.2f} ms "
                  f"(32 connections, {seconds:g}s; statuses {counts})")
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
    parser.add_argument("--events-per-step", type=int, default=50, help="events of one micro-batch")
    parser.add_argument("--at", default="100,1000,10000",
                        help="the micro-batches after which refreshes are timed (comma-separated, at least 5)")
    parser.add_argument("--active-users", type=int, default=10_000,
                        help="the users the speed events are of (the run holds --entities)")
    parser.add_argument("--refresh-s", type=float, default=0.25,
                        help="the refresh loop's period while probing step → visible in SQL")
    parser.add_argument("--steps", type=int, help="micro-batches in all: --at steps/100,steps/10,steps")
    parser.add_argument("--speed-events", type=int, help="events in all: --events-per-step speed-events/steps")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--skip-http", action="store_true",
                        help="engine figures only (no services besides the script's own redis-server)")
    args = parser.parse_args()
    at = sorted(int(n) for n in args.at.split(",")) if args.steps is None else \
        [args.steps // 100, args.steps // 10, args.steps]
    if at[0] < 5:
        parser.error("refreshes are timed after at least 5 micro-batches")
    per_step = args.events_per_step if args.speed_events is None else max(1, args.speed_events // at[-1])
    from infra.redis import RedisService
    from lakehouse.config import load_settings

    (REPO / "var").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-serving-", dir=REPO / "var") as scratch:
        redis_server = RedisService(load_settings(state_dir=Path(scratch) / "state", redis_port=_free_port(),
                                                  redis_maxmemory="4gb"))
        redis_server.start()
        try:
            redis_server.wait_ready()
            url = redis_server.url
            lakehouse, users = write_run(Path(scratch) / "delta", url, args.entities)
            speed = SpeedLayer(online_store(url, lakehouse), users, per_step, at[-1], args.active_users)
            engine_figures(lakehouse, url, users, speed, at, args.refresh_s)
            if not args.skip_http:
                from lakehouse.serve import ray_local_env

                os.environ.update(ray_local_env())  # before Ray is imported: it reads them then
                import ray

                ray.init(address=load_settings().ray_address, log_to_driver=False)
                http_figures(lakehouse, url, users, args.seconds)
        finally:
            redis_server.stop()


if __name__ == "__main__":
    main()
