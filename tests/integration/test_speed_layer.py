"""The speed layer against real Kafka, Ray Serve, Delta and MLflow: exactly-once scoring
(also across SIGKILLs and with two members in a group), the DLQ, features equal to the
batch layer's, and a boundary handover in the middle of a stream."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batch.ingest import ingest_topics
from batch.training_set import point_in_time_features
from batch.validate import validate_topic
from batch.views import compute_views
from lakehouse.config import Settings
from lakehouse.errors import ServiceError
from lakehouse.fraud import FRAUD_SPEC
from lakehouse.online import open_store
from lakehouse.online.base import Seen
from lakehouse.streams import producer
from tests.integration.streams import (
    LiveLayer,
    Stream,
    group_state,
    new_stream,
    owning,
    read_dlq,
    read_topic,
    run_in_process,
    scored,
    scored_count,
    scored_or_empty,
    send,
    serve_champion,
    speed_process,
    wait_for,
)

pytestmark = pytest.mark.integration

USER_FEATURES = [n for n in FRAUD_SPEC.feature_names if not n.startswith("merchant_")]


@pytest.fixture(scope="module")
def served(ray_cluster: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A champion model on the platform's Ray Serve, as app `model`."""
    yield from serve_champion(ray_cluster, tmp_path_factory.mktemp("bundles"))


def assert_exactly_once(stream: Stream) -> list[dict[str, Any]]:
    rows = scored(stream)
    ids = Counter(r["event_id"] for r in rows)
    assert not [i for i, n in ids.items() if n > 1], "scored twice"
    assert set(ids) == stream.valid_ids
    assert len({(r["partition"], r["offset"]) for r in rows}) == len(rows)
    return rows


def kafka_positions(stream: Stream) -> dict[bytes, set[tuple[int, int]]]:
    """(partition, offset) of every record of the stream's topic, by value."""
    out: dict[bytes, set[tuple[int, int]]] = {}
    for r in read_topic(stream.settings, stream.topic):
        out.setdefault(r.value, set()).add((r.partition, r.offset))
    return out


def test_every_valid_event_is_scored_once_and_invalid_ones_reach_the_dlq(served: Settings) -> None:
    stream = new_stream(served, 3000, seed=41, malformed_fraction=0.02, duplicate_fraction=0.01,
                        late_fraction=0.02)
    send(stream, stream.messages)
    counts = run_in_process(stream)
    rows = assert_exactly_once(stream)
    assert counts["scored"] == len(rows) == len(stream.valid_ids)
    assert {r["model_version"] for r in rows} == {1}
    assert all(0.0 < r["score"] < 1.0 and len(r["features"]) == len(FRAUD_SPEC.feature_names) for r in rows)
    rejected = [m for m in stream.messages if m.kind.startswith("malformed:") or m.kind == "duplicate"]
    dlq = read_dlq(stream)
    assert counts["dlq"] == len(dlq) == len(rejected)
    sources = kafka_positions(stream)  # value → (partition, offset) of each record on the topic
    by_value: dict[bytes, list[str]] = {}
    for record in dlq:
        headers = dict(record.headers)
        by_value.setdefault(record.value, []).append(headers["reason"].decode())
        assert headers["source_topic"].decode() == stream.topic
        source = (int(headers["source_partition"]), int(headers["source_offset"]))
        assert source in sources[record.value], (source, sources[record.value])
    for message in rejected:
        reasons = by_value[message.value]
        if message.kind == "duplicate":
            assert "duplicate:event_id" in reasons
        else:
            rule = message.kind.split(":", 1)[1]
            assert any(r.split(":")[0] == rule for r in reasons), (message.kind, reasons)


def test_sigkill_part_way_still_scores_each_event_once_and_dlqs_each_bad_record_once(served: Settings) -> None:
    """Three SIGKILLs, each landing after some but not all events were scored, with invalid
    records and duplicates mixed in (so some kills fall between a batch's DLQ delivery and
    its commit): every valid event is scored once, every bad record reaches the DLQ once."""
    stream = new_stream(served, 12_000, seed=42, malformed_fraction=0.03, duplicate_fraction=0.01)
    send(stream, stream.messages)
    total = len(stream.valid_ids)
    rng = random.Random(7)
    for share in (0.1, 0.3, 0.5):
        process = speed_process(stream, "killed", max_batch=100)
        target = int(total * rng.uniform(share - 0.05, share + 0.05))
        # the condition is only polled within this iteration
        wait_for(lambda: process.poll() is not None or scored_count(stream) >= target,  # noqa: B023
                 timeout=300, every_s=0.1)
        assert process.poll() is None, process.communicate()[1][-3000:]
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
        done = len({r["event_id"] for r in scored_or_empty(stream)})
        assert 0 < done < total, (done, total)  # the kill landed part-way
    final = speed_process(stream, "killed", "--idle-exit", "5")
    out, err = final.communicate(timeout=600)
    assert final.returncode == 0, err[-3000:]
    assert_exactly_once(stream)
    sources = kafka_positions(stream)
    bad = {position for m in stream.messages if m.kind.startswith("malformed:") or m.kind == "duplicate"
           for position in sources[m.value] if m.kind != "duplicate" or position != min(sources[m.value])}
    delivered = Counter((int(dict(r.headers)["source_partition"]), int(dict(r.headers)["source_offset"]))
                        for r in read_dlq(stream))
    assert set(delivered) == bad
    assert set(delivered.values()) == {1}, [k for k, n in delivered.items() if n > 1][:5]


def test_two_members_of_a_group_share_the_partitions_exactly_once(served: Settings) -> None:
    """Both members join, then the stream arrives; each owns some partitions and scores
    its share. (A member restarting mid-stream is the SIGKILL test's rebalance.)"""
    from lakehouse.generator import produce

    stream = new_stream(served, 8000, seed=43, malformed_fraction=0.0, duplicate_fraction=0.0)
    members = [speed_process(stream, "pair", "--idle-exit", "15") for _ in range(2)]
    time.sleep(10.0)  # both in the group before the first record
    kafka = producer(stream.settings.kafka_bootstrap_servers)
    produce([m._replace(topic=stream.topic) for m in stream.messages], producer=kafka, rate=1000.0)
    kafka.close()
    scored_by = []
    for member in members:
        out, err = member.communicate(timeout=600)
        assert member.returncode == 0, err[-3000:]
        scored_by.append(json.loads(out.strip().splitlines()[-1])["scored"])
    rows = assert_exactly_once(stream)
    assert len({r["consumer_group"] for r in rows}) == 1
    assert all(n > 0 for n in scored_by) and sum(scored_by) == len(rows)  # both took part


def test_a_member_stalled_past_the_session_timeout_is_fenced(served: Settings) -> None:
    """Two members score a backlog; one is SIGSTOPped mid-batch for longer than the session
    timeout, so the other takes its partitions and scores that batch; SIGCONT lets the
    stalled one finish its batch: its store step applies none of those records twice, and
    every event is scored exactly once."""
    stream = new_stream(served, 40_000, seed=45, malformed_fraction=0.0, duplicate_fraction=0.0)
    send(stream, stream.messages)
    members = [speed_process(stream, "fenced", "--idle-exit", "20") for _ in range(2)]
    wait_for(lambda: scored_count(stream) > 2000, timeout=300, every_s=0.2)
    members[0].send_signal(signal.SIGSTOP)
    stalled_at = scored_count(stream)
    time.sleep(25.0)  # 10 s session timeout, then the rebalance and the other member's commits
    assert scored_count(stream) > stalled_at  # the other member took over
    members[0].send_signal(signal.SIGCONT)
    outputs = []
    for member in members:
        out, err = member.communicate(timeout=600)
        assert member.returncode == 0, err[-3000:]
        outputs.append(err)
    assert_exactly_once(stream)
    # Which of its paths the stop hit (mid-batch: stale rows or a refused commit; polling: a
    # late revocation) depends on timing, so it is not asserted; exactly once is (above).


def test_features_equal_the_training_sets_for_every_entity_across_a_handover(served: Settings, spark) -> None:  # type: ignore[no-untyped-def]
    """Two members of one group on four partitions; half the stream, a batch run over it
    (cutting the online store), the other half: both adopt the run mid-stream, and for
    every scored event the training set's recomputation as of the row's coverage vector
    equals the features the speed layer served, every feature, merchants included (train/
    serve skew 0)."""
    assert served.kafka_partitions == 4
    stream = new_stream(served, 4000, seed=44)
    half = len(stream.messages) // 2
    first_ids = {m.event_id for m in stream.messages[:half] if m.kind in ("valid", "late")}
    members = [LiveLayer(stream, "live") for _ in range(2)]
    try:
        # the first member takes every partition, the second scales the group out
        members[0].start()
        wait_for(lambda: owning(members[:1]), timeout=120, why=lambda: group_state(members))
        members[1].start()
        wait_for(lambda: owning(members), timeout=180, why=lambda: group_state(members))
        send(stream, stream.messages[:half])
        wait_for(lambda: len(scored_or_empty(stream)) >= len(first_ids))
        ingest_topics(spark, stream.lakehouse, bootstrap_servers=served.kafka_bootstrap_servers,
                      topics=[stream.topic])
        gx = Path(stream.lakehouse.root) / "gx"
        validate_topic(spark, stream.lakehouse, stream.spec.events, gx_dir=gx)
        store = open_store(served, stream.spec, group="live", root=stream.lakehouse.root)
        run = compute_views(spark, stream.lakehouse, stream.spec, store=store,  # published while it scores
                            partitions=served.kafka_partitions)
        assert run.cut_epochs == {p: 1 for p in range(served.kafka_partitions)}
        assert sum(run.boundary.values()) + len(run.boundary) == half
        send(stream, stream.messages[half:])
        wait_for(lambda: owning(members) and len(scored_or_empty(stream)) >= len(stream.valid_ids))
    finally:
        for member in members:
            member.stop()
    layers = [member.layer for member in members]
    rows = assert_exactly_once(stream)
    after = [r for r in rows if r["offset"] > run.boundary[r["partition"]]]
    assert all(layer.state.base.run_id == run.run_id for layer in layers)  # adopted live
    assert any(r["batch_run_id"] == run.run_id for r in after)
    assert {r["consumer_group"] for r in rows} == {"live"} and len({tuple(r["coverage"]) for r in rows}) > 10

    ingest_topics(spark, stream.lakehouse, bootstrap_servers=served.kafka_bootstrap_servers,
                  topics=[stream.topic])
    validate_topic(spark, stream.lakehouse, stream.spec.events, gx_dir=gx)
    vectors = spark.read.format("delta").load(stream.lakehouse.scored_events)
    batch = {r["event_id"]: r for r in point_in_time_features(
        spark.read.format("delta").load(stream.lakehouse.silver("transaction")), stream.spec,
        vectors=vectors).collect()}
    names = list(FRAUD_SPEC.feature_names)
    merchant = [n for n in names if n not in USER_FEATURES]
    assert merchant, "the spec has features of an entity that does not key the messages"
    for row in rows:
        expected = batch[row["event_id"]]
        assert dict(zip(names, row["features"], strict=True)) == {n: expected[n] for n in names}, row["event_id"]


def test_sigterm_stops_cleanly_and_metrics_are_served(served: Settings) -> None:
    import socket
    import urllib.request

    with socket.socket() as probe:  # a free port for the metrics endpoint
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stream = new_stream(served, 3000, seed=45, malformed_fraction=0.01, duplicate_fraction=0.0)
    send(stream, stream.messages)
    process = speed_process(stream, "metered", "--metrics-port", str(port))
    try:
        wait_for(lambda: len(scored_or_empty(stream)) > 0, timeout=120)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            exposed = response.read().decode()
        for name in ("lambdalake_speed_events_total", "lambdalake_speed_batch_records",
                     "lambdalake_speed_scoring_seconds", "lambdalake_speed_end_to_end_seconds",
                     "lambdalake_speed_consumer_lag", "lambdalake_speed_model_version"):
            assert name in exposed, name
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err[-3000:]
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["scored"] == len(scored(stream))  # what it says it wrote is in Delta
    rest = speed_process(stream, "metered", "--idle-exit", "5")
    _, err = rest.communicate(timeout=600)
    assert rest.returncode == 0, err[-3000:]
    assert_exactly_once(stream)


def _topic_with_dlq(settings: Settings, dlq_config: dict[str, str], partitions: int = 2) -> Stream:
    """A stream whose DLQ topic has the given broker configuration."""
    import dataclasses
    import uuid

    from kafka.admin import KafkaAdminClient, NewTopic

    stream = new_stream(settings, 600, seed=47, malformed_fraction=0.0, duplicate_fraction=0.0)
    topic = f"events-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    try:
        admin.create_topics([NewTopic(topic, partitions, 1),
                             NewTopic(f"{topic}.dlq", partitions, 1, topic_configs=dlq_config)])
    finally:
        admin.close()
    spec = dataclasses.replace(stream.spec, events=dataclasses.replace(stream.spec.events, topic=topic),
                               dlq_topic=f"{topic}.dlq")
    return dataclasses.replace(stream, spec=spec, topic=topic)


def test_a_failed_dlq_delivery_commits_nothing_of_its_batch(served: Settings) -> None:
    """The broker refuses a DLQ record (the DLQ topic takes at most 1 KiB): the layer stops
    before the batch's Delta and Kafka commits, so after the fix every record is handled once."""
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

    from lakehouse import scored
    from lakehouse.errors import ServiceError

    stream = _topic_with_dlq(served, {"max.message.bytes": "1024"})
    bad = stream.messages[0]._replace(value=b"{" + b"x" * 3000, kind="malformed:malformed_json")
    send(stream, [*stream.messages[:300], bad, *stream.messages[300:]])
    with pytest.raises(ServiceError, match="DLQ records of this micro-batch were not delivered"):
        run_in_process(stream, group="dlq-fails")
    positions = kafka_positions(stream)
    bad_partition, bad_offset = next(iter(positions[bad.value]))
    resume = scored.resume_offsets(stream.lakehouse, "dlq-fails", stream.topic, [bad_partition])
    assert resume[bad_partition] <= bad_offset  # its batch was not committed
    assert all(r["offset"] < bad_offset for r in scored_or_empty(stream) if r["partition"] == bad_partition)
    admin = KafkaAdminClient(bootstrap_servers=served.kafka_bootstrap_servers)
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, f"{stream.topic}.dlq",
                                            configs={"max.message.bytes": "1048588"})])
    finally:
        admin.close()
    counts = run_in_process(stream, group="dlq-fails")
    assert_exactly_once(stream)
    assert counts["dlq"] == 1
    dlq = read_dlq(stream)
    assert [(int(dict(r.headers)["source_partition"]), int(dict(r.headers)["source_offset"])) for r in dlq] == [
        (bad_partition, bad_offset)]


def test_a_resume_offset_kafka_no_longer_holds_is_an_error_with_the_numbers(served: Settings) -> None:
    from kafka import TopicPartition
    from kafka.admin import KafkaAdminClient

    from lakehouse.errors import ServiceError
    from lakehouse.serve import serve_scorer
    from speed.consumer import SpeedLayer, SpeedOptions

    stream = _topic_with_dlq(served, {}, partitions=1)
    send(stream, stream.messages[:200])
    admin = KafkaAdminClient(bootstrap_servers=served.kafka_bootstrap_servers)
    try:  # retention deletes the first 50 records before the speed layer ever read them
        admin.delete_records({TopicPartition(stream.topic, 0): 50})
    finally:
        admin.close()
    with pytest.raises(ServiceError, match="must resume at offset 0, but Kafka holds offsets from 50 only: 50 records"):
        run_in_process(stream, group="gone")
    layer = SpeedLayer(stream.settings, stream.spec, serve_scorer(), lakehouse=stream.lakehouse,
                       options=SpeedOptions(group_id="gone", max_batch=500, on_missing_offsets="skip"))
    counts = layer.run(threading.Event(), idle_exit_s=4.0)
    assert counts["scored"] == 150
    assert sorted(r["offset"] for r in scored(stream)) == list(range(50, 200))


def test_a_wiped_store_is_rebuilt_exactly_and_the_layer_resumes_on_it(served: Settings, spark) -> None:  # type: ignore[no-untyped-def]
    """A batch run cuts the store mid-stream; the store is wiped; `rebuild_store` re-derives
    the same applied offsets, live states and seen sets from Delta, and the speed layer goes
    on scoring each event exactly once on the rebuilt store."""
    from lakehouse.online.base import event_identity
    from speed.rebuild import rebuild_store

    stream = new_stream(served, 3000, seed=47)
    group, partitions = "rebuilt", served.kafka_partitions
    store = open_store(served, stream.spec, group=group, root=stream.lakehouse.root)
    third = len(stream.messages) // 3
    send(stream, stream.messages[:third])
    run_in_process(stream, group=group)
    ingest_topics(spark, stream.lakehouse, bootstrap_servers=served.kafka_bootstrap_servers, topics=[stream.topic])
    validate_topic(spark, stream.lakehouse, stream.spec.events, gx_dir=Path(stream.lakehouse.root) / "gx")
    run = compute_views(spark, stream.lakehouse, stream.spec, store=store, partitions=partitions)
    send(stream, stream.messages[third:2 * third])
    run_in_process(stream, group=group)
    identities: dict[int, list[str]] = {p: [] for p in range(partitions)}
    for r in read_topic(served, stream.topic):
        try:
            event = stream.spec.events.parse(r.value)
        except Exception:  # noqa: BLE001 - invalid records have no identity
            continue
        identities[r.partition].append(event_identity(stream.spec.events, event))

    def state() -> tuple[dict[int, int], dict[int, Any], Seen]:
        scans = {p: store.scan(p, run.cut_epochs[p]) for p in range(partitions)}
        return ({p: s[0] for p, s in scans.items()}, {p: dict(s[1]) for p, s in scans.items()},
                store.seen(identities))

    before = state()
    assert sum(len(s) for s in before[1].values()) > 0  # live states above the cut
    store.wipe()
    assert store.applied(range(partitions)) == {p: -1 for p in range(partitions)}
    rebuilt = rebuild_store(store, stream.spec, stream.lakehouse, partitions=partitions)
    assert rebuilt.run_id == run.run_id and rebuilt.applied == before[0]
    assert state() == before
    send(stream, stream.messages[2 * third:])
    run_in_process(stream, group=group)
    rows = scored(stream)
    ids = Counter(r["event_id"] for r in rows)
    assert not [i for i, n in ids.items() if n > 1], "scored twice"
    assert set(ids) == stream.valid_ids  # the layer stepped before the run: nothing was floored


def test_copies_within_the_dedup_horizon_are_duplicates_in_both_layers_and_later_ones_events(
        served: Settings, spark) -> None:  # type: ignore[no-untyped-def]
    """Copies of events sent with Kafka timestamps inside and beyond a 2-second horizon, some
    carrying an old timestamp: validation (two slices) and the speed layer take exactly the
    records the rule's plain definition takes, per partition in offset order, and the store's
    seen set keeps only the identities within one horizon of the partition's clock."""
    import dataclasses

    horizon = 2000
    stream = new_stream(served, 400, seed=71, malformed_fraction=0.0, duplicate_fraction=0.0, late_fraction=0.0)
    stream = dataclasses.replace(stream, spec=dataclasses.replace(
        stream.spec, events=dataclasses.replace(stream.spec.events, dedup_horizon_ms=horizon)))
    originals = stream.messages[:300]
    base = int(time.time() * 1000) - 3_600_000
    timed = [(base + i * 100, m) for i, m in enumerate(originals)]
    timed += [(base + j * 100 + (1500 if j % 2 else 2600), originals[j]) for j in range(0, 300, 5)]
    late = [(base + j * 100, originals[j]) for j in range(3, 300, 25)]  # an old timestamp, sent last
    timed.sort(key=lambda t: t[0])
    kafka = producer(served.kafka_bootstrap_servers)
    halves = (timed[:len(timed) // 2], timed[len(timed) // 2:] + late)
    for number, half in enumerate(halves):
        for timestamp, m in half:
            kafka.send(stream.topic, key=m.key, value=m.value, timestamp_ms=timestamp)
        kafka.flush()
        ingest_topics(spark, stream.lakehouse, bootstrap_servers=served.kafka_bootstrap_servers,
                      topics=[stream.topic])
        validate_topic(spark, stream.lakehouse, stream.spec.events, gx_dir=Path(stream.lakehouse.root) / "gx")
        if number == 0:  # the speed layer's store carries the clock and the seen set over a restart
            scored_first = scored(stream) if run_in_process(stream, group="horizon")["scored"] else []
    kafka.close()

    # the rule, written out plainly, over the topic as Kafka holds it
    expected: set[tuple[int, int]] = set()
    clocks: dict[tuple[int, int], int] = {}
    final: dict[int, int] = {}
    per_partition: dict[int, list[Any]] = {}
    for r in sorted(read_topic(served, stream.topic), key=lambda r: (r.partition, r.offset)):
        per_partition.setdefault(r.partition, []).append(r)
    for p, records in per_partition.items():
        clock, taken = -1, []
        for r in records:
            event = stream.spec.events.parse(r.value)
            identity = (event["user_id"], event["event_id"])
            mine = max(clock, r.timestamp)
            if not any(i == identity and c >= mine - horizon for i, c in taken):
                taken.append((identity, mine))
                clock = mine
                expected.add((p, r.offset))
                clocks[(p, r.offset)] = mine
        final[p] = clock
    total = sum(len(v) for v in per_partition.values())
    assert 0 < total - len(expected) < len(timed) - len(originals) + len(late)  # some copies are events

    silver = spark.read.format("delta").load(stream.lakehouse.silver("transaction")).collect()
    assert {(r["partition"], r["offset"]) for r in silver} == expected
    assert all(int(r["arrival_clock"].timestamp() * 1000) == clocks[(r["partition"], r["offset"])] for r in silver)
    quarantine = spark.read.format("delta").load(stream.lakehouse.quarantine("transaction")).collect()
    assert len(quarantine) == total - len(expected)
    assert all(list(r["reasons"]) == ["duplicate:event_id"] for r in quarantine)

    counts = run_in_process(stream, group="horizon")
    rows = scored(stream)
    assert {(r["partition"], r["offset"]) for r in rows} == expected
    assert counts["scored"] == len(expected) - len(scored_first)
    assert len(read_dlq(stream)) == total - len(expected)

    from lakehouse.online.base import event_identity

    store = open_store(served, stream.spec, group="horizon", root=stream.lakehouse.root)
    identities: dict[int, list[str]] = {}
    within: dict[int, dict[str, int]] = {}
    for p, records in per_partition.items():
        for r in records:
            identity = event_identity(stream.spec.events, stream.spec.events.parse(r.value))
            identities.setdefault(p, []).append(identity)
            clock = clocks.get((p, r.offset))
            if clock is not None and clock >= final[p] - horizon:
                within.setdefault(p, {})[identity] = clock
    assert {p: seen for p, (_, seen) in store.seen(identities).items() if seen} == within
    assert {p: clock for p, (clock, _) in store.seen(identities).items()} == final


def test_a_failing_model_service_stops_the_layer_with_its_error_and_nothing_applied(platform: Settings) -> None:
    """Scoring runs while the store's steps read what they change; when it fails (after its
    retries) the layer stops with the model service's error, not a wait for the store, and
    no step was written: the batch is consumed again on restart."""
    from speed.consumer import SpeedLayer, SpeedOptions

    stream = new_stream(platform, 300, seed=47)
    send(stream, stream.messages)
    calls: list[int] = []

    def failing(rows: list[list[float]]) -> tuple[list[float], int]:
        calls.append(len(rows))
        raise RuntimeError("the model is down")

    layer = SpeedLayer(stream.settings, stream.spec, failing, lakehouse=stream.lakehouse,
                       options=SpeedOptions(group_id="failing", max_batch=500, score_retries=1, run_check_s=0.5))
    with pytest.raises(ServiceError, match="the model service failed 2 times: the model is down"):
        layer.run(threading.Event(), idle_exit_s=30)
    assert len(calls) == 2
    store = open_store(stream.settings, stream.spec, group="failing", root=stream.lakehouse.root)
    assert set(store.applied(range(stream.settings.kafka_partitions)).values()) == {-1}
