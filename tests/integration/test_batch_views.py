"""Batch views against the test oracle's plain recomputation over the same events,
and the publish step: readers see only complete runs, with their boundary."""

from __future__ import annotations

import dataclasses
import uuid
from decimal import Decimal

import pytest

from batch.ingest import ingest_topics
from batch.validate import validate_topic
from batch.views import compute_views, read_view
from lakehouse.config import Settings
from lakehouse.fraud import FRAUD_SPEC, TRANSACTIONS
from lakehouse.generator import GeneratorOptions, generate
from lakehouse.streams import ensure_topics, producer
from lakehouse.tables import BUCKET, Lakehouse, latest_run
from tests.oracle import view_states

pytestmark = pytest.mark.integration


def test_batch_views_equal_an_independent_recomputation(spark, platform: Settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    suffix = uuid.uuid4().hex[:8]
    topic = f"events-{suffix}"
    ensure_topics(platform.kafka_bootstrap_servers, [topic], partitions=platform.kafka_partitions)
    lakehouse = Lakehouse(f"{platform.delta_uri}/views-{suffix}")
    spec = dataclasses.replace(FRAUD_SPEC, events=dataclasses.replace(TRANSACTIONS, topic=topic))

    kafka = producer(platform.kafka_bootstrap_servers)
    sent = [m for m in generate(GeneratorOptions(events=5000, seed=21, late_fraction=0.05))
            if m.topic == TRANSACTIONS.topic]
    for message in sent:
        kafka.send(topic, key=message.key, value=message.value)
    kafka.flush()
    kafka.close()

    assert latest_run(lakehouse) is None
    ingest_topics(spark, lakehouse, bootstrap_servers=platform.kafka_bootstrap_servers, topics=[topic])
    validate_topic(spark, lakehouse, spec.events, gx_dir=tmp_path / "gx")
    run = compute_views(spark, lakehouse, spec)

    assert latest_run(lakehouse) == run
    assert sum(run.boundary.values()) + len(run.boundary) == len(sent)  # every offset included
    valid: dict[str, dict] = {}  # type: ignore[type-arg]
    for message in sent:
        if message.kind in ("valid", "late"):
            valid.setdefault(message.event_id, TRANSACTIONS.parse(message.value))
    assert run.row_counts["events"] == len(valid)

    for view in spec.views:
        expected = view_states(view, valid.values(), spec.events.time_field)
        rows = read_view(spark, lakehouse, run, view.name).collect()
        got = {
            (r[view.entity], r[BUCKET]): {
                name: int(r[name]) if isinstance(r[name], Decimal) else r[name]
                for name in view.aggregations
            }
            for r in rows
        }
        assert got == expected, view.name
        assert {r["batch_run_id"] for r in rows} == {run.run_id}
        expected_rows = len(rows)

    # a later run that dies before publishing leaves a gold version that no reader sees
    read_view(spark, lakehouse, run, "user_all").limit(1).write.format("delta").mode("overwrite").save(
        lakehouse.gold("user_all"))
    assert spark.read.format("delta").load(lakehouse.gold("user_all")).count() == 1
    published = latest_run(lakehouse)
    assert published == run
    assert read_view(spark, lakehouse, published, "user_all").count() == run.row_counts["user_all"]
    assert expected_rows == run.row_counts[spec.views[-1].name]


def test_the_boundary_is_what_validation_routed_not_bronzes_high_water_mark(  # type: ignore[no-untyped-def]
        spark, platform: Settings, tmp_path) -> None:
    """An ingest between validate and views adds bronze offsets that silver does not have:
    the run's boundary stops where validation stopped, so no event falls in between."""
    suffix = uuid.uuid4().hex[:8]
    topic = f"events-{suffix}"
    ensure_topics(platform.kafka_bootstrap_servers, [topic], partitions=platform.kafka_partitions)
    lakehouse = Lakehouse(f"{platform.delta_uri}/boundary-{suffix}")
    spec = dataclasses.replace(FRAUD_SPEC, events=dataclasses.replace(TRANSACTIONS, topic=topic))
    messages = [m for m in generate(GeneratorOptions(events=3000, seed=22)) if m.topic == TRANSACTIONS.topic]
    kafka = producer(platform.kafka_bootstrap_servers)
    for m in messages[:2000]:
        kafka.send(topic, key=m.key, value=m.value)
    kafka.flush()
    ingest_topics(spark, lakehouse, bootstrap_servers=platform.kafka_bootstrap_servers, topics=[topic])
    validate_topic(spark, lakehouse, spec.events, gx_dir=tmp_path / "gx")
    validated = {int(r["partition"]): int(r["offset"]) for r in spark.read.format("delta").load(
        lakehouse.bronze(topic)).groupBy("partition").agg({"offset": "max"}).withColumnRenamed(
        "max(offset)", "offset").collect()}
    for m in messages[2000:]:
        kafka.send(topic, key=m.key, value=m.value)
    kafka.flush()
    kafka.close()
    ingest_topics(spark, lakehouse, bootstrap_servers=platform.kafka_bootstrap_servers, topics=[topic])
    run = compute_views(spark, lakehouse, spec)  # before the new slice is validated
    assert run.boundary == validated and run.sequence == 1
    silver_ids = {r["event_id"] for r in spark.read.format("delta").load(
        lakehouse.silver(spec.events.name)).select("event_id").collect()}
    assert run.row_counts["events"] == len(silver_ids)
    validate_topic(spark, lakehouse, spec.events, gx_dir=tmp_path / "gx")
    later = compute_views(spark, lakehouse, spec)
    assert later.sequence == 2 and all(later.boundary[p] > o for p, o in validated.items())
    assert sum(later.boundary.values()) + len(later.boundary) == len(messages)
