"""Freshness benchmark, on a running platform (`lambdalake up`) with a model service: how long
from producing an event until it is visible in `GET /v1/entities/...` and in SQL
(`merged.user_all`), while a background stream runs at a fixed rate.

The speed layer runs as its own process (`lambdalake speed run`, on a fresh topic and
lakehouse); the HTTP API runs in this process (uvicorn, the platform's own `build_serving`),
probed over HTTP. Every probe is an event of a user no one has seen: it is visible when
`/v1/entities/user_id/<user>/features` says `known`, and when a SQL query finds the user in
`merged.user_all` (the SQL views refresh every `--refresh-s`). Run:

    .venv/bin/python -m tests.benchmarks.freshness --rate 2000 --seconds 30 --probes 100
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import threading
import time
import uuid
from typing import Any

import numpy as np

from lakehouse.serve import ray_local_env

os.environ.update(ray_local_env())  # before Ray is imported

import httpx  # noqa: E402
from pydantic import SecretStr  # noqa: E402

from lakehouse.config import Settings, load_settings  # noqa: E402
from lakehouse.spec import format_timestamp_ms  # noqa: E402
from lakehouse.streams import producer  # noqa: E402
from tests.benchmarks.speed_layer import events_of, serve_model  # noqa: E402
from tests.integration.streams import Stream, new_stream, speed_process  # noqa: E402

KEY = "bench-fresh-admin-key-0123456789"


def start_api(settings: Settings, stream: Stream) -> tuple[str, Any]:
    import uvicorn

    from serving.api import create_app
    from serving.server import build_serving

    serving, _ = build_serving(settings, stream.spec, lakehouse=stream.lakehouse)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(serving), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return url, server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the API never became ready")
        time.sleep(0.2)


def background(stream: Stream, rate: float, seconds: float, done: threading.Event) -> None:
    kafka = producer(stream.settings.kafka_bootstrap_servers)
    messages = events_of(int(rate * seconds), seed=9)
    started = time.monotonic()
    for i, m in enumerate(messages):
        if done.is_set():
            break
        kafka.send(stream.topic, key=m.key, value=m.value)
        ahead = started + (i + 1) / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    kafka.flush()
    kafka.close()


def probe_once(client: httpx.Client, kafka: Any, stream: Stream, template: dict[str, Any],
               timeout_s: float) -> tuple[float, float]:
    """(ms until /v1/entities knows a new user, ms until SQL finds it); inf if not in time."""
    user = f"probe-{uuid.uuid4().hex[:10]}"
    event = {**template, "event_id": f"p-{uuid.uuid4().hex[:10]}", "user_id": user,
             "event_time": format_timestamp_ms(int(time.time() * 1000))}
    sent = time.perf_counter()
    kafka.send(stream.topic, key=user.encode(), value=json.dumps(event).encode())
    kafka.flush()
    entities = sql = float("inf")
    query = {"query": f"SELECT count FROM merged.user_all WHERE user_id = '{user}'"}
    while time.perf_counter() - sent < timeout_s and (entities == float("inf") or sql == float("inf")):
        if entities == float("inf") and client.get(f"/v1/entities/user_id/{user}/features").json().get("known"):
            entities = (time.perf_counter() - sent) * 1000
        if sql == float("inf") and client.post("/v1/sql", json=query).json().get("row_count"):
            sql = (time.perf_counter() - sent) * 1000
        time.sleep(0.002)
    return entities, sql


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=2000.0, help="background events per second")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--refresh-s", type=float, default=0.25, help="the API's SQL refresh interval")
    args = parser.parse_args()
    base = load_settings()
    serve_model(base)

    stream = new_stream(base, 10, seed=8)
    group = f"fresh-{uuid.uuid4().hex[:6]}"
    settings = base.model_copy(update={
        "speed_group": group, "delta_root": stream.lakehouse.root, "serving_refresh_s": args.refresh_s,
        "api_keys": SecretStr(f"bench:{KEY}:predict+features+sql")})
    speed = speed_process(stream, group, "--max-wait-ms", str(settings.speed_max_wait_ms))
    url, server = start_api(settings, stream)
    template = json.loads(next(m for m in stream.messages if m.kind == "valid").value)
    done = threading.Event()
    try:
        with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=30) as http:
            kafka = producer(stream.settings.kafka_bootstrap_servers)
            # the speed member joins the group: wait until a first probe is seen at all
            warm = probe_once(http, kafka, stream, template, timeout_s=120)
            print(f"speed layer ready (first probe visible after {warm[0]:.0f} ms)", flush=True)
            feeder = threading.Thread(target=background, args=(stream, args.rate, args.seconds, done))
            feeder.start()
            time.sleep(2.0)  # the stream is flowing
            results = []
            spacing = max(0.05, (args.seconds - 4.0) / max(1, args.probes))
            for _ in range(args.probes):
                if not feeder.is_alive():
                    break
                results.append(probe_once(http, kafka, stream, template, timeout_s=30))
                time.sleep(spacing)
            done.set()
            feeder.join()
            kafka.close()
    finally:
        server.should_exit = True
        speed.send_signal(signal.SIGTERM)
        speed.wait(timeout=60)
    entities = np.array([r[0] for r in results])
    sql = np.array([r[1] for r in results])

    def shown(values: np.ndarray, q: float) -> str:
        value = np.percentile(values, q)
        return f"{value:.0f} ms" if np.isfinite(value) else "not visible in 30 s"

    print(f"freshness at {args.rate:,.0f} events/s background, {len(results)} probes: "
          f"produce → /v1/entities p50 {shown(entities, 50)}, p99 {shown(entities, 99)}; "
          f"produce → SQL (refresh every {args.refresh_s:g} s) p50 {shown(sql, 50)}, p99 {shown(sql, 99)}",
          flush=True)


if __name__ == "__main__":
    main()
