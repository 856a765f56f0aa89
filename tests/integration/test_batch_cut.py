"""A batch run cuts the speed layer's online store and takes the cut as its boundary, on a
Kafka broker and a redis-server of its own (started here, on free loopback ports): stepped
partitions end at the store's applied offset (silver caught up to it where validation lay
below), never-stepped ones at the validated boundary with their identities remembered, a
store beyond what Kafka holds stops the run, and the epochs no reader needs are dropped."""

from __future__ import annotations

import dataclasses
import socket
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition

from batch import jobs
from batch.views import compute_views, read_view, validated_boundary
from infra.kafka import KafkaService
from infra.redis import RedisService
from lakehouse.config import Settings, load_settings
from lakehouse.errors import BatchError, ValidationError
from lakehouse.fraud import FRAUD_SPEC, TRANSACTIONS
from lakehouse.generator import GeneratorOptions, generate
from lakehouse.online import open_store
from lakehouse.online.base import OnlineStore, StateKey, Step, event_identity, increments_of, merge_into
from lakehouse.recompute import states_by_view
from lakehouse.spec import PlatformSpec
from lakehouse.streams import ensure_topics, kafka_client_config, producer, topic_partitions
from lakehouse.tables import BUCKET, BatchRun, Lakehouse, latest_run, table_version

pytestmark = pytest.mark.integration

PARTITIONS = 3
TIME = TRANSACTIONS.time_field
Located = tuple[int, int, dict[str, Any]]  # (partition, offset, typed event)


def quiet(line: str) -> None:
    """An echo that keeps the jobs' progress out of the test output."""


def _free_port(*, with_next: bool = False) -> int:
    """A free loopback port (and the one after it free too: Kafka's controller port)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not with_next:
            return port
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


@pytest.fixture(scope="module")
def services(spark: Any, settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A Kafka broker and a redis-server of their own (the platform's services, infra.kafka
    and infra.redis), with the jars the `spark` fixture made sure of."""
    state = tmp_path_factory.mktemp("state")
    (state / "jars").symlink_to(settings.jars_dir)
    config = load_settings(state_dir=state, kafka_bootstrap_servers=f"127.0.0.1:{_free_port(with_next=True)}",
                           redis_port=_free_port(), kafka_partitions=PARTITIONS)
    started = []
    try:
        for service in (RedisService(config), KafkaService(config)):
            started.append(service)
            service.start()
            service.wait_ready()
        yield config
    finally:
        for service in reversed(started):
            service.stop()


@dataclasses.dataclass
class Case:
    """One test's topic, lakehouse and settings (the broker and redis-server are shared)."""

    settings: Settings
    spec: PlatformSpec
    lakehouse: Lakehouse
    store: OnlineStore

    @property
    def topic(self) -> str:
        return self.spec.events.topic


@pytest.fixture
def case(services: Settings, tmp_path: Path) -> Case:
    topic = f"events-{uuid.uuid4().hex[:8]}"
    ensure_topics(services, [topic], partitions=PARTITIONS)
    config = services.model_copy(update={"delta_root": str(tmp_path / "delta")})
    spec = dataclasses.replace(FRAUD_SPEC, events=dataclasses.replace(TRANSACTIONS, topic=topic))
    return Case(config, spec, Lakehouse(config.delta_uri), open_store(config, spec))


def produce(case: Case, seed: int, events: int) -> None:
    kafka = producer(case.settings)
    for m in generate(GeneratorOptions(events=events, seed=seed)):
        if m.topic == TRANSACTIONS.topic:
            kafka.send(case.topic, key=m.key, value=m.value)
    kafka.flush()
    kafka.close()


def ingest_and_validate(spark: Any, case: Case) -> None:
    jobs.run_ingest(case.settings, case.spec, spark=spark, topics=[case.topic], echo=quiet)
    jobs.run_validate(case.settings, case.spec, spark=spark, schemas=[case.spec.events], echo=quiet)


def validated(spark: Any, case: Case) -> dict[int, int]:
    name = case.spec.events.name
    return validated_boundary(spark, case.lakehouse, name, {
        "silver": table_version(spark, case.lakehouse.silver(name)),
        "quarantine": table_version(spark, case.lakehouse.quarantine(name))})


def silver_events(spark: Any, case: Case, version: int | None = None) -> list[Located]:
    from pyspark.sql import functions as F

    schema = case.spec.events
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    columns = [F.unix_millis(F.col(f.name)).alias(f.name) if f.type == "timestamp" else F.col(f.name)
               for f in schema.fields]
    rows = reader.load(case.lakehouse.silver(schema.name)).select("partition", "offset", *columns).collect()
    return [(int(r["partition"]), int(r["offset"]), {f: r[f] for f in schema.field_names}) for r in rows]


def kafka_events(case: Case, partition: int, first: int, last: int) -> list[tuple[int, dict[str, Any]]]:
    """The valid events of one partition's offsets first..last, straight from Kafka (as the
    speed layer consumes them, before any batch validation)."""
    consumer = KafkaConsumer(**kafka_client_config(case.settings), enable_auto_commit=False,
                             consumer_timeout_ms=10_000)
    tp = TopicPartition(case.topic, partition)
    consumer.assign([tp])
    consumer.seek(tp, first)
    out, seen_last = [], -1
    for record in consumer:
        seen_last = record.offset
        if record.offset > last:
            break
        try:
            out.append((record.offset, case.spec.events.parse(record.value, key=record.key)))
        except ValidationError:
            pass
        if record.offset == last:
            break
    consumer.close()
    assert seen_last >= last, f"Kafka ended at {seen_last} in partition {partition}, before {last}"
    return out


def step(case: Case, partition: int, first: int, last: int, events: list[tuple[int, dict[str, Any]]]) -> None:
    """The speed layer's step of the records first..last of a partition (`events`: the valid ones)."""
    schema = case.spec.events

    def above(applied: int) -> Step:
        fresh = [e for o, e in events if o > applied]
        return Step(increments_of(case.spec, fresh), {}, {event_identity(schema, e): 0 for e in fresh})

    assert case.store.apply(partition, first, last, above)


def recomputed(spec: PlatformSpec, events: list[dict[str, Any]]) -> dict[StateKey, list[Any]]:
    """The plain recomputation (`lakehouse.recompute`) per (view, entity, bucket)."""
    tables = states_by_view(spec.views, events, TIME)
    return {(view.name, entity, bucket): [states[a] for a in view.aggregations]
            for view in spec.views for (entity, bucket), states in tables[view.name].items()}


def gold(spark: Any, case: Case, run: BatchRun) -> dict[StateKey, list[Any]]:
    def plain(value: Any) -> Any:
        return int(value) if isinstance(value, Decimal) else value

    return {(view.name, r[view.entity], int(r[BUCKET])): [plain(r[a]) for a in view.aggregations]
            for view in case.spec.views for r in read_view(spark, case.lakehouse, run, view.name).collect()}


def within(events: list[Located], boundary: dict[int, int]) -> list[dict[str, Any]]:
    return [e for p, o, e in events if o <= boundary.get(p, -1)]


def test_the_boundary_is_the_stores_cut_and_never_stepped_partitions_are_floored(  # type: ignore[no-untyped-def]
        spark, case: Case) -> None:
    """Partition 0: the speed layer applied beyond validation (the run catches silver up to
    it); partition 1: it lags behind validation; partition 2: it never stepped (the floor)."""
    assert topic_partitions(case.settings, case.topic) == PARTITIONS
    assert topic_partitions(case.settings, f"absent-{uuid.uuid4().hex[:8]}") == 0
    produce(case, seed=31, events=1500)
    ingest_and_validate(spark, case)
    before = validated(spark, case)
    silver_before = table_version(spark, case.lakehouse.silver(case.spec.events.name))
    produce(case, seed=32, events=900)  # in Kafka, not yet in bronze or silver
    consumer = KafkaConsumer(**kafka_client_config(case.settings))
    ends = {tp.partition: o - 1 for tp, o in consumer.end_offsets(
        [TopicPartition(case.topic, p) for p in range(PARTITIONS)]).items()}
    consumer.close()
    assert all(ends[p] > before[p] + 10 for p in range(PARTITIONS))
    ahead, lagging = (before[0] + ends[0]) // 2, before[1] // 2
    step(case, 0, 0, ahead, kafka_events(case, 0, 0, ahead))
    step(case, 1, 0, lagging, kafka_events(case, 1, 0, lagging))

    run = jobs.run_views(case.settings, case.spec, spark=spark, echo=quiet)

    assert run.boundary == {0: ahead, 1: lagging, 2: before[2]}  # the cut, not what validation reached
    assert run.cut_epochs == {0: 1, 1: 1, 2: 1}
    assert silver_before is not None and run.source_versions["silver_events"] > silver_before  # caught up
    assert validated(spark, case)[0] >= ahead
    assert latest_run(case.lakehouse) == run
    assert case.store.applied(range(PARTITIONS)) == run.boundary
    events = silver_events(spark, case, run.source_versions["silver_events"])
    assert max(o for p, o, _ in events if p == 2) > before[2]  # silver went on; the cut did not move
    expected = within(events, run.boundary)
    assert run.row_counts["events"] == len(expected)
    assert gold(spark, case, run) == recomputed(case.spec, expected)

    # the floor of partition 2 passed over its validated events: their identities are remembered
    floored = [event_identity(case.spec.events, e) for p, o, e in events if p == 2 and o <= before[2]]
    later = [event_identity(case.spec.events, e) for p, o, e in events if p == 2 and o > before[2]]
    assert floored and later
    assert set(case.store.seen({2: floored})[2][1]) == set(floored)
    assert case.store.seen({2: later})[2][1] == {}


def test_a_store_beyond_what_kafka_holds_stops_the_run(spark, case: Case) -> None:  # type: ignore[no-untyped-def]
    produce(case, seed=33, events=300)
    ingest_and_validate(spark, case)
    reached = validated(spark, case)
    beyond = reached[0] + 500  # a store restored from another cluster's topic, say
    assert case.store.apply(0, 0, beyond, lambda applied: Step({}, {}, {}))
    rounds = []

    def catch_up() -> None:
        rounds.append(1)
        ingest_and_validate(spark, case)

    with pytest.raises(BatchError, match=(
            rf"after 3 catch-up round\(s\).* partition\(s\) 0 \(validated through offset {reached[0]}, "
            rf"store cut at {beyond}\).*lambdalake batch validate")):
        compute_views(spark, case.lakehouse, case.spec, store=case.store, partitions=PARTITIONS,
                      catch_up=catch_up)
    assert len(rounds) == 3
    assert latest_run(case.lakehouse) is None


def test_a_published_run_drops_the_epochs_up_to_the_previous_runs_cut(  # type: ignore[no-untyped-def]
        spark, case: Case) -> None:
    """Run 1 floors every partition (never stepped); the speed layer then applies batch B
    (epoch 2, closed by run 2) and batch C (epoch 3, closed by run 3). Publishing run 3 drops
    the epochs up to run 2's cut: run 2's readers read only epochs after it, exactly."""

    def speed_layer_catches_up() -> list[Located]:
        """Validate what Kafka has, then step every partition through it (from silver)."""
        ingest_and_validate(spark, case)
        events, reached = silver_events(spark, case), validated(spark, case)
        applied = case.store.applied(range(PARTITIONS))
        fresh = []
        for p in range(PARTITIONS):
            if reached.get(p, -1) > applied[p]:
                mine = [(o, e) for q, o, e in events if q == p and o > applied[p]]
                step(case, p, applied[p] + 1, reached[p], mine)
                fresh += [(p, o, e) for o, e in mine]
        return fresh

    produce(case, seed=34, events=600)
    ingest_and_validate(spark, case)
    first = jobs.run_views(case.settings, case.spec, spark=spark, echo=quiet)
    assert first.cut_epochs == {0: 1, 1: 1, 2: 1}
    produce(case, seed=35, events=600)
    speed_layer_catches_up()
    second = jobs.run_views(case.settings, case.spec, spark=spark, echo=quiet)
    assert second.cut_epochs == {0: 2, 1: 2, 2: 2}
    produce(case, seed=36, events=600)
    batch_c = speed_layer_catches_up()
    keys = list(recomputed(case.spec, [e for _, _, e in silver_events(spark, case)]))
    assert case.store.read(keys, range(PARTITIONS), {p: 1 for p in range(PARTITIONS)}).states != \
        case.store.read(keys, range(PARTITIONS), second.cut_epochs).states  # epoch 2 holds batch B

    summary = jobs.views(case.settings, case.spec, echo=quiet, spark=spark)
    third = latest_run(case.lakehouse)
    assert third is not None and summary["batch_run_id"] == third.run_id
    assert summary["cut_epochs"] == {"0": 3, "1": 3, "2": 3} and third.sequence == 3

    # epochs up to run 2's cut are gone; epoch 3 (batch C, after run 2's cut) is kept
    after_first = case.store.read(keys, range(PARTITIONS), {p: 1 for p in range(PARTITIONS)}).states
    assert after_first == recomputed(case.spec, [e for _, _, e in batch_c])
    # run 2's readers: gold(run 2) ⊕ the epochs after its cut = every event, exactly
    merged = gold(spark, case, second)
    for key, states in case.store.read(keys, range(PARTITIONS), second.cut_epochs).states.items():
        merge_into(case.spec, merged, key, states)
    everything = silver_events(spark, case)
    assert merged == recomputed(case.spec, [e for _, _, e in everything])
    # run 3's readers: gold alone (nothing applied since its cut)
    assert gold(spark, case, third) == recomputed(case.spec, within(everything, third.boundary))
    assert third.boundary == case.store.applied(range(PARTITIONS))
