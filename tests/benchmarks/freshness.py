"""Freshness benchmark, on a running platform (`lambdalake up`) with a model service: how long
from producing an event until it is visible in `GET /v1/entities/...` and in SQL
(`merged.user_all`), while a background stream runs at a fixed rate.

Each part runs as its own process, as on a deployment: the speed layer (`lambdalake speed
run`, on a fresh topic and lakehouse), the HTTP API (the platform's own `build_serving` under
uvicorn), and the background producer. This process only probes: every probe is an event of
a user no one has seen, watched by two threads at once, one polling
`/v1/entities/user_id/<user>/features` until it says `known`, one polling SQL until
`merged.user_all` holds the user (the SQL views refresh every `--refresh-s`). Run:

    .venv/bin/python -m tests.benchmarks.freshness --rate 2000 --seconds 30 --probes 100
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from lakehouse.serve import ray_local_env

os.environ.update(ray_local_env())  # before Ray is imported

import httpx  # noqa: E402
from pydantic import SecretStr  # noqa: E402

from lakehouse.config import Settings, load_settings  # noqa: E402
from lakehouse.spec import format_timestamp_ms  # noqa: E402
from lakehouse.streams import producer  # noqa: E402
from lakehouse.tables import Lakehouse  # noqa: E402
from tests.benchmarks.speed_layer import events_of, serve_model  # noqa: E402
from tests.integration.streams import discard, new_stream, spec_on, speed_process  # noqa: E402

KEY = "bench-fresh-admin-key-0123456789"


def api_settings(base: Settings, group: str, root: str, refresh_s: float) -> Settings:
    return base.model_copy(update={
        "speed_group": group, "delta_root": root, "serving_refresh_s": refresh_s,
        "api_keys": SecretStr(f"bench:{KEY}:predict+features+sql")})


def run_api(args: argparse.Namespace) -> None:
    """--role api: the platform's API on the benchmark's topic and lakehouse, until SIGTERM."""
    import uvicorn

    from serving.api import create_app
    from serving.server import build_serving

    settings = api_settings(load_settings(), args.group, args.root, args.refresh_s)
    serving, _ = build_serving(settings, spec_on(args.topic), lakehouse=Lakehouse(args.root))
    uvicorn.run(create_app(serving), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


def run_feed(args: argparse.Namespace) -> None:
    """--role feed: the background stream at `--rate` for `--seconds`, sent in 5 ms ticks
    through librdkafka (confluent-kafka): on a shared laptop the load generator must not take
    the cores it measures (kafka-python's producer took a third of a core at 1,000 events/s)."""
    from confluent_kafka import Producer

    # murmur2_random: the Java client's partitioner (librdkafka's default hashes keys with CRC32),
    # so each user's events land in its home partition, as the platform's producers place them
    kafka = Producer({"bootstrap.servers": load_settings().kafka_bootstrap_servers, "acks": "all",
                      "linger.ms": 5, "client.id": "bench-feeder", "partitioner": "murmur2_random"})
    messages = events_of(int(args.rate * args.seconds), seed=9)
    print("feeding", flush=True)
    started = time.monotonic()
    sent = 0
    while sent < len(messages):
        due = min(len(messages), int((time.monotonic() - started) * args.rate) + 1)
        for m in messages[sent:due]:
            kafka.produce(args.topic, key=m.key, value=m.value)
        sent = due
        kafka.poll(0)  # delivery reports
        time.sleep(max(0.0, started + sent / args.rate - time.monotonic(), 0.005))
    left = kafka.flush(60)
    print(f"fed {len(messages) - left} events in {time.monotonic() - started:.1f} s", flush=True)


def role(name: str, **options: Any) -> subprocess.Popen[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    return subprocess.Popen([sys.executable, "-m", "tests.benchmarks.freshness", "--role", name, *flags],
                            stdout=subprocess.PIPE, text=True)


def wait_ready(url: str, api: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if api.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the API never became ready")
        time.sleep(0.2)


class CpuShare:
    """Each named process's share of the machine's CPU time from now until `shares()` (the
    rest: Kafka, Redis, Ray, Airflow, the kernel): on a laptop everything shares the cores."""

    def __init__(self, pids: dict[str, int]) -> None:
        import psutil

        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.started = {name: sum(p.cpu_times()[:2]) for name, p in self.processes.items()}
        self.machine = psutil.cpu_times()
        self.wall, self.cores = time.monotonic(), psutil.cpu_count() or 1

    def shares(self) -> str:
        import psutil

        now = psutil.cpu_times()
        busy = sum(now[:3]) - sum(self.machine[:3])  # user, nice, system
        used = {name: sum(p.cpu_times()[:2]) - self.started[name] for name, p in self.processes.items()}
        total = (time.monotonic() - self.wall) * self.cores
        parts = [f"{name} {100 * t / total:.0f} %" for name, t in used.items()]
        rest = busy - sum(used.values())
        return ", ".join([*parts, f"the rest {100 * rest / total:.0f} %",
                          f"idle {100 * max(0.0, total - busy) / total:.0f} % (of {self.cores} cores)"])


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def batch_phases(metrics_port: int) -> str:
    """A speed member's mean micro-batch and where its wall time goes, from its metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    end_to_end: list[tuple[float, float]] = []  # (bucket's upper bound, events at or below it)
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.labels.get("phase", family.name)
            if sample.name.endswith("_sum"):
                sums[key] = sample.value
            elif sample.name.endswith("_count"):
                counts[key] = sample.value
            elif sample.name == "lambdalake_speed_end_to_end_seconds_bucket":
                end_to_end.append((float(sample.labels["le"]), sample.value))
    batches = counts.get("lambdalake_speed_batch_records", 0.0)
    if not batches:
        return "no micro-batch"
    phases = ", ".join(f"{phase} {1000 * sums[phase] / counts[phase]:.1f} ms"
                       for phase in ("parse", "read", "features", "step") if counts.get(phase))
    if counts.get("lambdalake_speed_scoring_seconds"):
        scoring = sums["lambdalake_speed_scoring_seconds"] / counts["lambdalake_speed_scoring_seconds"]
        phases += f" (scoring, during the step: {1000 * scoring:.1f} ms)"
    total = max((n for _, n in end_to_end), default=0.0)

    def at_most(q: float) -> str:  # the bucket bound below which a share q of the events were stepped
        bound = next((le for le, n in sorted(end_to_end) if n >= q * total), float("inf"))
        return f"≤ {1000 * bound:.0f} ms" if bound != float("inf") else "> 30 s"

    return (f"{batches:.0f} micro-batches of {sums['lambdalake_speed_batch_records'] / batches:.0f} records "
            f"on average; per micro-batch: {phases}; Kafka timestamp → store step: p50 {at_most(0.5)}, "
            f"p99 {at_most(0.99)}")


def probe_once(clients: tuple[httpx.Client, httpx.Client], kafka: Any, topic: str,
               template: dict[str, Any], timeout_s: float) -> tuple[float, float]:
    """(ms until /v1/entities knows a new user, ms until SQL finds it); inf if not in time.
    Each endpoint has its own polling thread, so neither waits on the other's answers."""
    user = f"probe-{uuid.uuid4().hex[:10]}"
    event = {**template, "event_id": f"p-{uuid.uuid4().hex[:10]}", "user_id": user,
             "event_time": format_timestamp_ms(int(time.time() * 1000))}
    seen = {"entities": float("inf"), "sql": float("inf")}
    query = {"query": f"SELECT count FROM merged.user_all WHERE user_id = '{user}'"}
    checks = {
        "entities": lambda c: c.get(f"/v1/entities/user_id/{user}/features").json().get("known"),
        "sql": lambda c: c.post("/v1/sql", json=query).json().get("row_count"),
    }

    def watch(name: str, client: httpx.Client) -> None:
        while time.perf_counter() - sent < timeout_s:
            if checks[name](client):
                seen[name] = (time.perf_counter() - sent) * 1000
                return
            time.sleep(0.01)  # a 10 ms poll: enough resolution, little load

    sent = time.perf_counter()
    kafka.send(topic, key=user.encode(), value=json.dumps(event).encode())
    kafka.flush()
    watchers = [threading.Thread(target=watch, args=pair) for pair in zip(checks, clients, strict=True)]
    for watcher in watchers:
        watcher.start()
    for watcher in watchers:
        watcher.join()
    return seen["entities"], seen["sql"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=2000.0, help="background events per second")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--refresh-s", type=float, default=0.25, help="the API's SQL refresh interval")
    parser.add_argument("--members", type=int, default=1, help="speed layer members (one consumer group)")
    parser.add_argument("--keep", action="store_true", help="keep the topic, lakehouse and store")
    parser.add_argument("--role", choices=("probe", "api", "feed"), default="probe", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--group", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role != "probe":
        return run_api(args) if args.role == "api" else run_feed(args)
    base = load_settings()
    serve_model(base)

    stream = new_stream(base, 10, seed=8)
    group = f"fresh-{uuid.uuid4().hex[:6]}"
    port, *metric_ports = free_ports(1 + args.members)
    logs = Path(base.state_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    members = [speed_process(stream, group, "--max-wait-ms", str(base.speed_max_wait_ms),
                             "--metrics-port", str(metric_ports[i]), max_batch=None,
                             log=(logs / f"freshness-{group}-{i}.log").open("w"))  # the platform's defaults
               for i in range(args.members)]
    print(f"speed layer: {args.members} member(s) of group {group}, logs: {logs}/freshness-{group}-*.log", flush=True)
    api = role("api", topic=stream.topic, root=stream.lakehouse.root, group=group, port=port,
               refresh_s=args.refresh_s)
    feed = None
    url = f"http://127.0.0.1:{port}"
    template = json.loads(next(m for m in stream.messages if m.kind == "valid").value)
    results = []
    try:
        wait_ready(url, api)
        clients = (httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=30),
                   httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=30))
        kafka = producer(stream.settings.kafka_bootstrap_servers)
        # the speed member joins the group: wait until a first probe is seen at all
        warm = probe_once(clients, kafka, stream.topic, template, timeout_s=120)
        print(f"speed layer ready (first probe visible after {warm[0]:.0f} ms)", flush=True)
        feed = role("feed", topic=stream.topic, rate=args.rate, seconds=args.seconds)
        assert feed.stdout is not None
        feed.stdout.readline()  # "feeding"
        ends = time.monotonic() + args.seconds - 1.0  # probe while the stream flows
        time.sleep(2.0)  # the stream is flowing
        cpu = CpuShare({**{f"speed member {i}": m.pid for i, m in enumerate(members)},
                        "API": api.pid, "feeder": feed.pid, "probes": os.getpid()})
        spacing = max(0.05, (args.seconds - 4.0) / max(1, args.probes))
        for _ in range(args.probes):
            if time.monotonic() > ends:
                break
            results.append(probe_once(clients, kafka, stream.topic, template, timeout_s=30))
            time.sleep(spacing)
        print(f"CPU while probing: {cpu.shares()}", flush=True)
        for i, metrics_port in enumerate(metric_ports):
            print(f"speed member {i}: {batch_phases(metrics_port)}", flush=True)
        print(feed.stdout.read().strip(), flush=True)
        kafka.close()
    finally:
        for process in (feed, api, *members):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in (feed, api, *members):
            if process is not None:
                process.wait(timeout=60)
        if not args.keep:
            from lakehouse.online import open_store

            discard(base, stream.topic, stream.lakehouse.root,
                    open_store(base, stream.spec, group=group, root=stream.lakehouse.root))
    entities = np.array([r[0] for r in results])
    sql = np.array([r[1] for r in results])

    def shown(values: np.ndarray, q: float) -> str:
        value = np.percentile(values, q)
        return f"{value:.0f} ms" if np.isfinite(value) else "not visible in 30 s"

    print(f"freshness at {args.rate:,.0f} events/s background, {args.members} speed member(s), {len(results)} probes: "
          f"produce → /v1/entities p50 {shown(entities, 50)}, p99 {shown(entities, 99)}; "
          f"produce → SQL (refresh every {args.refresh_s:g} s) p50 {shown(sql, 50)}, p99 {shown(sql, 99)}",
          flush=True)


if __name__ == "__main__":
    main()
