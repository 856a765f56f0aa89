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


def spec_on(topic: str) -> Any:
    """The fraud spec with its transactions on `topic` (and its DLQ on `<topic>.dlq`)."""
    return dataclasses.replace(FRAUD_SPEC, events=dataclasses.replace(TRANSACTIONS, topic=topic),
                               dlq_topic=f"{topic}.dlq")


def new_stream(settings: Settings, events: int, seed: int, **options: Any) -> Stream:
    suffix = uuid.uuid4().hex[:8]
    topic = f"events-{suffix}"
    ensure_topics(settings.kafka_bootstrap_servers, [topic, f"{topic}.dlq"],
                  partitions=settings.kafka_partitions)
    spec = spec_on(topic)
    messages = [m for m in generate(GeneratorOptions(events=events, seed=seed, **options))
                if m.topic == TRANSACTIONS.topic]
    return Stream(settings, spec, Lakehouse(f"{settings.delta_uri}/speed-{suffix}"), topic, messages)


def discard(settings: Settings, topic: str, root: str, store: Any = None) -> None:
    """Delete a scratch stream: its topic and DLQ topic, its lakehouse directory, and its group's
    online store if given (benchmarks that leave nothing behind)."""
    import shutil

    from kafka.admin import KafkaAdminClient

    from lakehouse.streams import kafka_client_config

    if store is not None:
        store.wipe()
    shutil.rmtree(root, ignore_errors=True)
    try:
        admin = KafkaAdminClient(**kafka_client_config(settings))
        admin.delete_topics([topic, f"{topic}.dlq"])
        admin.close()
    except Exception as error:  # noqa: BLE001 - the topics are only scratch
        print(f"(topic {topic} not deleted: {error!r})", file=sys.stderr)


def send(stream: Stream, messages: list[Message]) -> None:
    kafka = producer(stream.settings.kafka_bootstrap_servers)
    for m in messages:
        kafka.send(stream.topic, key=m.key, value=m.value)
    kafka.flush()
    kafka.close()


def cli_env(stream: Stream) -> dict[str, str]:
    return {**os.environ, "LAMBDALAKE_DELTA_ROOT": stream.lakehouse.root,
            "LAMBDALAKE_MODEL_NAME": stream.settings.model_name}


def speed_process(stream: Stream, group: str, *extra: str, max_batch: int | None = 200,
                  log: Any = None) -> subprocess.Popen[str]:
    """`lambdalake speed run` on the stream's topic, as its own process (`max_batch` None: the
    default); its output piped, or written to the file `log` (a long run that nobody reads
    would fill the pipe and stall)."""
    output = subprocess.PIPE if log is None else log
    batch = [] if max_batch is None else ["--max-batch", str(max_batch)]
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "lambdalake"), "speed", "run", "--topic", stream.topic,
         "--group", group, *batch, *extra],
        env=cli_env(stream), cwd=REPO, stdout=output, stderr=output, text=True)


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


def wait_for(condition: Any, timeout: float = 300.0, every_s: float = 1.0,
             why: Any = None) -> None:
    """Until `condition()`; on timeout fails with `why()` (where things stand) if given."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s" + (f": {why()}" if why else ""))
        time.sleep(every_s)


# ------------------------------------------------------------------ the oracle, from the topic
Located = tuple[int, int, dict[str, Any]]  # (partition, offset, typed event)


def last_offsets(settings: Settings, topic: str) -> dict[int, int]:
    """Per partition of a topic, the highest offset Kafka holds (-1: none)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        return {tp.partition: end - 1 for tp, end in consumer.end_offsets(partitions).items()}
    finally:
        consumer.close()


def arrivals(stream: Stream) -> list[Located]:
    """Every event of the stream's topic as the layers take it, read from Kafka itself: the
    records the spec's validation routine accepts (given their Kafka key and timestamp, as
    every layer calls it), a later copy of an event (same key entity and id: one partition)
    left out, in offset order per partition. (Every copy of these tests' streams arrives
    within seconds of the first, so any deduplication horizon of minutes agrees.)"""
    from lakehouse.errors import ValidationError

    schema = stream.spec.events
    seen: set[tuple[Any, Any]] = set()
    out: list[Located] = []
    for r in sorted(read_topic(stream.settings, stream.topic), key=lambda r: (r.partition, r.offset)):
        try:
            event = schema.parse(r.value, key=r.key, arrival_ms=r.timestamp if r.timestamp >= 0 else None)
        except ValidationError:
            continue
        identity = (event[schema.key_field], event[schema.id_field])
        if identity not in seen:
            seen.add(identity)
            out.append((r.partition, r.offset, event))
    return out


def oracle_states(spec: Any, arrived: list[Located], coverage: dict[int, int]) -> dict[str, Any]:
    """Every view's states per (entity, bucket) over the events at or below `coverage` (the
    plain recomputation of tests/oracle.py)."""
    from tests.oracle import states_by_view

    return states_by_view(spec.views, [e for p, o, e in arrived if o <= coverage.get(p, -1)],
                          spec.events.time_field)


def oracle_row(view: Any, table: dict[tuple[Any, int], dict[str, Any]], entity: Any) -> dict[str, Any] | None:
    """merged.<view>'s states of one entity by the oracle: over the window that ends at the
    entity's own newest bucket (every bucket, for a view without a window); None when no
    event of the table has the entity."""
    from tests.oracle import window_states

    buckets = [b for (e, b) in table if e == entity]
    return window_states(view, table, entity, max(buckets)) if buckets else None


def oracle_features(spec: Any, tables: dict[str, Any], event: dict[str, Any]) -> dict[str, float]:
    """The fraud model's inputs of a typed event by the oracle, from the states of `tables`
    over the event's windows (what /v1/predict answers for an event it does not record)."""
    from tests.oracle import fraud_model_inputs, window_states

    time_ms = event[spec.events.time_field]
    return fraud_model_inputs({v.name: window_states(v, tables[v.name], event[v.entity], time_ms)
                               for v in spec.views}, event)


def as_coverage(reported: dict[str, int]) -> dict[int, int]:
    """A coverage vector (or boundary) as the API reports it ({"0": offset, ...}) → {0: offset}."""
    return {int(p): int(o) for p, o in reported.items()}


# ------------------------------------------------------------------ a member in this process
class LiveLayer:
    """A speed-layer member running in a thread of this process until `stop()` (also as a
    context manager); `check()` raises what stopped it early."""

    def __init__(self, stream: Stream, group: str, **options: Any) -> None:
        from lakehouse.serve import serve_scorer
        from speed.consumer import SpeedLayer, SpeedOptions

        chosen = {"max_batch": 200, "run_check_s": 0.5, "flush_s": 0.5, **options}
        self.layer = SpeedLayer(stream.settings, stream.spec, serve_scorer(), lakehouse=stream.lakehouse,
                                options=SpeedOptions(group_id=group, **chosen))
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self.counts: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name=f"speed-{group}", daemon=True)

    def _run(self) -> None:
        try:
            self.counts = self.layer.run(self._stop)
        except BaseException as error:  # noqa: BLE001 - raised by check() and stop()
            self._errors.append(error)

    def start(self) -> LiveLayer:
        self._thread.start()
        return self

    def check(self) -> None:
        if self._errors:
            raise AssertionError(f"the speed layer stopped: {self._errors[0]!r}") from self._errors[0]
        assert self._thread.is_alive(), "the speed layer stopped"

    def stop(self) -> dict[str, int]:
        self._stop.set()
        if self._thread.ident is None:  # never started
            return self.counts
        self._thread.join(timeout=120)
        assert not self._thread.is_alive(), "the speed layer did not stop within 120 s"
        if self._errors:
            raise AssertionError(f"the speed layer stopped: {self._errors[0]!r}") from self._errors[0]
        return self.counts

    def __enter__(self) -> LiveLayer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.stop()
        else:  # the test failed already: stop, and let its error through
            self._stop.set()
            self._thread.join(timeout=120)


def owning(members: list[LiveLayer]) -> bool:
    """Whether every member holds partitions (`check()`: none of them stopped)."""
    for member in members:
        member.check()
    return all(member.layer.owned for member in members)


def group_state(members: list[LiveLayer]) -> str:
    """Each member's partitions and where its thread is (for a group that does not settle)."""
    import traceback

    frames = sys._current_frames()
    described = []
    for i, member in enumerate(members):
        ident = member._thread.ident
        where = ("not started" if ident is None else "stopped" if ident not in frames else
                 "".join(traceback.format_stack(frames[ident], limit=6)))
        described.append(f"member {i} owns {sorted(member.layer.owned)}, errors {member._errors!r}, at\n{where}")
    return "\n".join(described)


def caught_up(store: Any, ends: dict[int, int]) -> bool:
    """Whether the store applied every partition through `ends` and its outbox is in Delta."""
    return store.applied(sorted(ends)) == ends and all(not store.pending(p)[1] for p in ends)
