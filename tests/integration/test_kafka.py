"""The real Apache Kafka broker: topics, keyed partitioning, produce/consume round trip."""

from __future__ import annotations

import uuid

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.partitioner.default import murmur2

from lakehouse.config import Settings
from lakehouse.fraud import FRAUD_SPEC
from lakehouse.streams import ensure_topics, producer

pytestmark = pytest.mark.integration


def test_spec_topics_are_created_once(platform: Settings) -> None:
    servers = platform.kafka_bootstrap_servers
    fresh = [f"created-once-{uuid.uuid4().hex[:8]}-{n}" for n in range(3)]
    assert sorted(ensure_topics(servers, fresh, partitions=2)) == sorted(fresh)
    assert ensure_topics(servers, fresh, partitions=2) == []
    ensure_topics(servers, FRAUD_SPEC.topics, partitions=platform.kafka_partitions)  # `up` made them
    assert ensure_topics(servers, FRAUD_SPEC.topics, partitions=platform.kafka_partitions) == []
    admin = KafkaAdminClient(bootstrap_servers=servers)
    try:
        described = {d["name"]: d for d in admin.describe_topics(list(FRAUD_SPEC.topics))}
    finally:
        admin.close()
    assert all(len(described[t]["partitions"]) == platform.kafka_partitions for t in FRAUD_SPEC.topics)


def test_keyed_round_trip_keeps_each_key_in_one_partition_in_order(platform: Settings) -> None:
    topic = f"roundtrip-{uuid.uuid4().hex[:8]}"
    partitions = platform.kafka_partitions
    ensure_topics(platform.kafka_bootstrap_servers, [topic], partitions=partitions)
    keys = [f"user-{i}".encode() for i in range(40)]
    sent = [(keys[i % len(keys)], f"value-{i}".encode()) for i in range(2000)]
    with_producer = producer(platform.kafka_bootstrap_servers)
    for key, value in sent:
        with_producer.send(topic, key=key, value=value)
    with_producer.flush()
    with_producer.close()

    consumer = KafkaConsumer(
        bootstrap_servers=platform.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=10_000,
    )
    consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
    received = []
    for message in consumer:
        received.append(message)
        if len(received) == len(sent):
            break
    consumer.close()

    assert sorted((m.key, m.value) for m in received) == sorted(sent)
    partition_of: dict[bytes, set[int]] = {}
    for message in received:
        partition_of.setdefault(message.key, set()).add(message.partition)
    # one partition per key, and it is the Java client's murmur2 choice
    assert all(len(parts) == 1 for parts in partition_of.values())
    assert all(parts == {(murmur2(key) & 0x7FFFFFFF) % partitions} for key, parts in partition_of.items())
    assert len({p for parts in partition_of.values() for p in parts}) == partitions
    # per key, the order of sending survives
    for key in keys:
        values = [m.value for m in sorted(received, key=lambda m: (m.partition, m.offset)) if m.key == key]
        assert values == [v for k, v in sent if k == key]


def test_generate_streams_every_message_with_its_truth(platform: Settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`lambdalake generate` into the real broker: every message arrives, keyed by user."""
    import json

    import pyarrow.parquet as pq

    from lakehouse.fraud import CHARGEBACK_LABELS, TRANSACTIONS
    from tests.conftest import lambdalake

    ensure_topics(platform.kafka_bootstrap_servers, FRAUD_SPEC.topics, partitions=platform.kafka_partitions)
    consumer = KafkaConsumer(bootstrap_servers=platform.kafka_bootstrap_servers,
                             enable_auto_commit=False, consumer_timeout_ms=10_000)
    parts = [TopicPartition(t, p) for t in ("events", "labels") for p in range(platform.kafka_partitions)]
    consumer.assign(parts)
    start = consumer.end_offsets(parts)  # only what this test sends
    for part, offset in start.items():
        consumer.seek(part, offset)

    truth_path = tmp_path / "truth.parquet"
    result = lambdalake("generate", "--events", "3000", "--seed", "11", "--truth", str(truth_path),
                        "--no-progress", "--malformed", "0.02", "--duplicates", "0.02", "--late", "0.02")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["by_topic"]["events"] == 3000

    received: dict[str, list] = {"events": [], "labels": []}  # type: ignore[type-arg]
    for message in consumer:
        received[message.topic].append(message)
        if sum(map(len, received.values())) == summary["messages"]:
            break
    consumer.close()
    assert len(received["events"]) == 3000
    assert len(received["labels"]) == summary["by_topic"]["labels"]

    truth = pq.read_table(truth_path).to_pylist()
    assert len(truth) == 3000
    valid_ids = set()
    for message in received["events"]:
        try:
            event = TRANSACTIONS.parse(message.value)
        except Exception:
            continue
        assert message.key == event["user_id"].encode()
        valid_ids.add(event["event_id"])
    expected_valid = {row["event_id"] for row in truth if row["kind"] in ("valid", "late", "duplicate")}
    assert valid_ids == expected_valid
    assert {CHARGEBACK_LABELS.parse(m.value)["event_id"] for m in received["labels"]} == valid_ids
