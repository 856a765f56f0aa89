"""Speed layer benchmark, on a running platform (`lambdalake up`) with a model service.

1. Saturation: N generated events already in a topic; the speed layer (Kafka → validation →
   features → Ray Serve → the online store; Delta every second) against a bare kafka-python
   consume + JSON decode loop over the same topic, run one after the other; events/s and
   the ratio.
2. Latency: events produced at a fixed rate (default 2,000/s) while the speed layer runs;
   p50/p99/max from the producer's record timestamp to the online-store step that holds
   the event (from then on serving reads it).

If the registry has no champion for LAMBDALAKE_MODEL_NAME, a random signed model is
registered (throughput does not depend on the weights). Run:

    .venv/bin/python -m tests.benchmarks.speed_layer --events 50000 --rate 2000 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from lakehouse.serve import ray_local_env

os.environ.update(ray_local_env())  # before Ray is imported

from lakehouse import registry  # noqa: E402
from lakehouse.config import load_settings  # noqa: E402
from lakehouse.fraud import FRAUD_SPEC, TRANSACTIONS  # noqa: E402
from lakehouse.generator import GeneratorOptions, generate, produce  # noqa: E402
from lakehouse.streams import ensure_topics, producer  # noqa: E402
from lakehouse.tables import Lakehouse  # noqa: E402
from tests.integration.streams import spec_on  # noqa: E402


def events_of(n: int, seed: int) -> list:  # type: ignore[type-arg]
    return [m for m in generate(GeneratorOptions(events=n, seed=seed)) if m.topic == TRANSACTIONS.topic]


def bare_loop(settings, topic: str, n: int) -> float:  # type: ignore[no-untyped-def]
    """kafka-python consume + json.loads of every record; seconds for n records."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap_servers,
                             group_id=f"bare-{uuid.uuid4().hex[:6]}", auto_offset_reset="earliest",
                             enable_auto_commit=False, max_poll_records=2000)
    seen, started = 0, None
    while seen < n:
        for records in consumer.poll(timeout_ms=500).values():
            if started is None:
                started = time.monotonic()
            for record in records:
                try:
                    json.loads(record.value)
                except ValueError:
                    pass
                seen += 1
    consumer.close()
    return time.monotonic() - (started or time.monotonic())


def speed_layer(settings, topic: str, lakehouse: Lakehouse, group: str):  # type: ignore[no-untyped-def]
    from lakehouse.serve import serve_scorer
    from speed.consumer import SpeedLayer, SpeedOptions

    return SpeedLayer(settings, spec_on(topic), serve_scorer(), lakehouse=lakehouse,
                      options=SpeedOptions(group_id=group))


def saturation(settings, n: int) -> None:  # type: ignore[no-untyped-def]
    topic = f"bench-sat-{uuid.uuid4().hex[:6]}"
    ensure_topics(settings.kafka_bootstrap_servers, [topic, f"{topic}.dlq"], partitions=settings.kafka_partitions)
    messages = events_of(n, seed=5)
    kafka = producer(settings.kafka_bootstrap_servers)
    for m in messages:
        kafka.send(topic, key=m.key, value=m.value)
    kafka.flush()
    kafka.close()
    bare = bare_loop(settings, topic, len(messages))
    lakehouse = Lakehouse(tempfile.mkdtemp(prefix="bench-speed-", dir=settings.state_path))
    layer = speed_layer(settings, topic, lakehouse, "bench-sat")
    first: list[tuple[float, int]] = []  # (time, rows) of the first commit
    layer.on_commit = lambda rows, at: first.append((at, len(rows))) if not first else None
    started = time.time()
    counts = layer.run(threading.Event(), max_events=len(messages))
    ended = time.time()
    elapsed = ended - started
    # after the first commit: the events committed after it, over the time after it
    after_first = counts["scored"] - (first[0][1] if first else 0)
    steady_s = ended - first[0][0] if first else elapsed
    steady_rate = after_first / steady_s if steady_s > 0 else float("nan")
    bare_rate = len(messages) / bare
    print(f"saturation, {len(messages):,} events: speed layer {len(messages) / elapsed:8,.0f} events/s "
          f"({elapsed:.1f}s incl. start-up; {counts['scored']:,} scored, {counts['dlq']} to the DLQ; "
          f"{steady_rate:,.0f}/s after the first commit: {after_first:,} events in {steady_s:.1f}s) | "
          f"bare consume+decode {bare_rate:9,.0f} events/s ({bare:.1f}s) | ratio "
          f"{len(messages) / elapsed / bare_rate:.3f} ({steady_rate / bare_rate:.3f} after start-up)", flush=True)
    shutil.rmtree(lakehouse.root, ignore_errors=True)


def latency(settings, rate: float, seconds: float) -> None:  # type: ignore[no-untyped-def]
    topic = f"bench-lat-{uuid.uuid4().hex[:6]}"
    ensure_topics(settings.kafka_bootstrap_servers, [topic, f"{topic}.dlq"], partitions=settings.kafka_partitions)
    lakehouse = Lakehouse(tempfile.mkdtemp(prefix="bench-speed-", dir=settings.state_path))
    layer = speed_layer(settings, topic, lakehouse, "bench-lat")
    delays: list[float] = []
    layer.on_commit = lambda rows, at: delays.extend(at * 1000 - r["kafka_timestamp"] / 1000 for r in rows)
    stop = threading.Event()
    worker = threading.Thread(target=layer.run, args=(stop,))
    worker.start()
    time.sleep(8.0)  # let it join the group before the clock starts
    messages = events_of(int(rate * seconds), seed=6)
    kafka = producer(settings.kafka_bootstrap_servers)
    sent = produce([m._replace(topic=topic) for m in messages], producer=kafka, rate=rate)
    kafka.close()
    wait_s = 120.0
    deadline = time.monotonic() + wait_s
    valid = sum(1 for m in messages if m.kind in ("valid", "late"))
    while len(delays) < valid and time.monotonic() < deadline:
        time.sleep(0.5)
    stop.set()
    worker.join()
    # an event not committed by the deadline counts as slower than every committed one
    missing = max(0, valid - len(delays))
    d = np.array(delays + [np.inf] * missing)

    def shown(q: float) -> str:
        value = np.percentile(d, q)
        return f"{value:.0f} ms" if np.isfinite(value) else f"> {wait_s:.0f} s (not committed)"

    print(f"latency at {rate:,.0f} events/s for {seconds:.0f}s ({sent.messages:,} sent, {valid:,} valid, "
          f"{len(delays):,} committed, {missing:,} missing at the deadline): produce → online-store step "
          f"p50 {shown(50)}, p99 {shown(99)}, max {shown(100)}", flush=True)
    shutil.rmtree(lakehouse.root, ignore_errors=True)


def serve_model(settings) -> None:  # type: ignore[no-untyped-def]
    """The model service on the platform's Ray: the champion of `bench-<spec fingerprint>`, or
    a random signed model registered under that name now (throughput does not depend on the
    weights; the platform's own model, perhaps trained on an older spec, is left alone)."""
    import ray

    from speed.model_service import ServiceArgs, serve_on_ray

    settings = settings.model_copy(update={"model_name": f"bench-{FRAUD_SPEC.fingerprint()}"})
    client = registry.client(settings.mlflow_uri)
    if registry.version_by_alias(client, settings.model_name, registry.CHAMPION) is None:
        from tests.integration.models import publish, random_model

        publish(settings, random_model(0), Path(tempfile.mkdtemp()))
    ray.init(address=settings.ray_address, log_to_driver=False)
    info = serve_on_ray(settings.ray_address, ServiceArgs.from_settings(settings))
    print(f"model service: {settings.model_name} v{info['version']} on {info['device']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    settings = load_settings()
    serve_model(settings)
    saturation(settings, args.events)
    latency(settings, args.rate, args.seconds)


if __name__ == "__main__":
    main()
