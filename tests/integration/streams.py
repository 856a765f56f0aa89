"""Streams of generated events on fresh topics, a champion on Ray Serve, and the speed layer
run in-process: what the speed and serving integration tests share."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lakehouse.config import Settings
from lakehouse.fraud import FRAUD_SPEC, TRANSACTIONS
from lakehouse.generator import GeneratorOptions, Message, generate
from lakehouse.streams import ensure_topics, producer
from lakehouse.tables import Lakehouse
from tests.conftest import REPO
from tests.integration.models import publish, random_model


def serve_champion(ray_cluster: Settings, bundles: Any) -> Iterator[Settings]:
    """A champion model on the platform's Ray Serve, as app `model` (a fixture's body)."""
    from ray import serve

    from lakehouse.serve import APP_NAME
    from speed.model_service import ServiceArgs, serve_on_ray

    settings = ray_cluster.model_copy(update={"model_name": f"it-{uuid.uuid4().hex[:6]}"})
    publish(settings, random_model(7), bundles)
    serve_on_ray(settings.ray_address, ServiceArgs.from_settings(settings, max_replicas=1))
    yield settings
    serve.delete(APP_NAME)


@dataclasses.dataclass
class Stream:
    settings: Settings
    spec: Any
    lakehouse: Lakehouse
    topic: str
    messages: list[Message]

    @property
    def valid_ids(self) -> set[str]:
        return {m.event_id for m in self.messages if m.kind in ("valid", "late")}


def new_stream(settings: Settings, events: int, seed: int, **options: Any) -> Stream:
    suffix = uuid.uuid4().hex[:8]
    topic = f"events-{suffix}"
    ensure_topics(settings.kafka_bootstrap_servers, [topic, f"{topic}.dlq"],
                  partitions=settings.kafka_partitions)
    spec = dataclasses.replace(FRAUD_SPEC, events=dataclasses.replace(TRANSACTIONS, topic=topic),
                               dlq_topic=f"{topic}.dlq")
    messages = [m for m in generate(GeneratorOptions(events=events, seed=seed, **options))
                if m.topic == TRANSACTIONS.topic]
    return Stream(settings, spec, Lakehouse(f"{settings.delta_uri}/speed-{suffix}"), topic, messages)


def send(stream: Stream, messages: list[Message]) -> None:
    kafka = producer(stream.settings.kafka_bootstrap_servers)
    for m in messages:
        kafka.send(stream.topic, key=m.key, value=m.value)
    kafka.flush()
    kafka.close()


def cli_env(stream: Stream) -> dict[str, str]:
    return {**os.environ, "LAMBDALAKE_DELTA_ROOT": stream.lakehouse.root,
            "LAMBDALAKE_MODEL_NAME": stream.settings.model_name}


def speed_process(stream: Stream, group: str, *extra: str) -> subprocess.Popen[str]:
    """`lambdalake speed run` on the stream's topic, as its own process."""
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "lambdalake"), "speed", "run", "--topic", stream.topic,
         "--group", group, "--max-batch", "200", *extra],
        env=cli_env(stream), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_in_process(stream: Stream, group: str = "it", idle_exit_s: float = 4.0) -> dict[str, int]:
    from lakehouse.serve import serve_scorer
    from speed.consumer import SpeedLayer, SpeedOptions

    layer = SpeedLayer(stream.settings, stream.spec, serve_scorer(), lakehouse=stream.lakehouse,
                       options=SpeedOptions(group_id=group, max_batch=500, run_check_s=0.5))
    return layer.run(threading.Event(), idle_exit_s=idle_exit_s)


def scored(stream: Stream) -> list[dict[str, Any]]:
    from deltalake import DeltaTable

    return DeltaTable(stream.lakehouse.scored_events).to_pyarrow_table().to_pylist()


def read_topic(settings: Settings, topic: str) -> list[Any]:
    """Every record of a topic, up to its end offsets (never stopping at an expected count,
    so a record delivered twice is seen)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                             enable_auto_commit=False, max_partition_fetch_bytes=2 * 1024 * 1024)
    partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    ends = consumer.end_offsets(partitions)
    out: list[Any] = []
    deadline = time.monotonic() + 120
    while any(consumer.position(tp) < ends[tp] for tp in partitions):
        assert time.monotonic() < deadline, f"topic {topic} could not be read to its end"
        for records in consumer.poll(timeout_ms=1000).values():
            out.extend(records)
    consumer.close()
    return out


def read_dlq(stream: Stream) -> list[Any]:
    """Every record of the stream's DLQ topic."""
    return read_topic(stream.settings, f"{stream.topic}.dlq")


def scored_count(stream: Stream) -> int:
    """Rows of the stream's scored_events (0 before its first commit), read cheaply."""
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(stream.lakehouse.scored_events):
        return 0
    return DeltaTable(stream.lakehouse.scored_events).to_pyarrow_table(columns=["offset"]).num_rows


def scored_or_empty(stream: Stream) -> list[dict[str, Any]]:
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(stream.lakehouse.scored_events):
        return []
    return scored(stream)


def wait_for(condition: Any, timeout: float = 300.0, every_s: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every_s)


