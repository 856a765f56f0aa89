"""Batch ingest and validation against the real broker, Spark and Delta: Kafka → bronze
exactly once (also across a killed run), and every bad-input kind ends in quarantine with its
reason while bronze keeps every raw record."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from batch.ingest import ingest_topics
from batch.validate import validate_topic
from lakehouse.config import Settings
from lakehouse.fraud import CHARGEBACK_LABELS, TRANSACTIONS
from lakehouse.generator import GeneratorOptions, generate
from lakehouse.streams import ensure_topics, producer
from lakehouse.tables import Lakehouse
from tests.conftest import REPO

pytestmark = pytest.mark.integration


@pytest.fixture()
def isolated(platform: Settings) -> tuple[Lakehouse, str, str]:
    """A lakehouse root and an events/labels topic pair of this test's own."""
    suffix = uuid.uuid4().hex[:8]
    topics = (f"events-{suffix}", f"labels-{suffix}")
    ensure_topics(platform.kafka_bootstrap_servers, topics, partitions=platform.kafka_partitions)
    return Lakehouse(f"{platform.delta_uri}/it-{suffix}"), *topics


def _send(settings: Settings, options: GeneratorOptions, events_topic: str, labels_topic: str) -> list:  # type: ignore[type-arg]
    """Send the generator's stream to the given topics; return the messages sent."""
    sent = []
    kafka = producer(settings.kafka_bootstrap_servers)
    for message in generate(options):
        topic = events_topic if message.topic == TRANSACTIONS.topic else labels_topic
        kafka.send(topic, key=message.key, value=message.value)
        sent.append(message)
    kafka.flush()
    kafka.close()
    return sent


def _bronze(spark, lakehouse: Lakehouse, topic: str):  # type: ignore[no-untyped-def]
    return spark.read.format("delta").load(lakehouse.bronze(topic))


def test_ingest_is_exactly_once_across_reruns(spark, platform: Settings, isolated) -> None:  # type: ignore[no-untyped-def]
    lakehouse, events, labels = isolated
    first = _send(platform, GeneratorOptions(events=1500, seed=1), events, labels)
    counts = {t: sum(1 for m in first if (m.topic == TRANSACTIONS.topic) == (t == events)) for t in (events, labels)}

    added = ingest_topics(spark, lakehouse, bootstrap_servers=platform.kafka_bootstrap_servers, topics=[events, labels])
    assert {a.topic: a.rows for a in added} == counts
    again = ingest_topics(spark, lakehouse, bootstrap_servers=platform.kafka_bootstrap_servers, topics=[events, labels])
    assert [a.rows for a in again] == [0, 0]

    more = _send(platform, GeneratorOptions(events=500, seed=2), events, labels)
    ingest_topics(spark, lakehouse, bootstrap_servers=platform.kafka_bootstrap_servers, topics=[events])
    bronze = _bronze(spark, lakehouse, events)
    expected = counts[events] + sum(1 for m in more if m.topic == TRANSACTIONS.topic)
    assert bronze.count() == expected
    assert bronze.select("partition", "offset").distinct().count() == expected
    # the raw bytes are kept exactly as sent
    sent_values = sorted(m.value for m in first + more if m.topic == TRANSACTIONS.topic)
    assert sorted(bytes(r["value"]) for r in bronze.select("value").collect()) == sent_values


def test_ingest_killed_mid_run_and_rerun_writes_each_record_once(spark, platform: Settings, isolated) -> None:  # type: ignore[no-untyped-def]
    lakehouse, events, labels = isolated
    sent = _send(platform, GeneratorOptions(events=12_000, seed=3, late_fraction=0.0), events, labels)
    n_events = sum(1 for m in sent if m.topic == TRANSACTIONS.topic)
    log_dir = Path(lakehouse.bronze(events)) / "_delta_log"
    env = {**os.environ, "LAMBDALAKE_DELTA_ROOT": lakehouse.root}
    command = [str(Path(sys.executable).parent / "lambdalake"), "batch", "ingest",
               "--topic", events, "--max-offsets-per-trigger", "500"]
    victim = subprocess.Popen(command, env=env, cwd=REPO, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(list(log_dir.glob("*.json"))) < 3:
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)  # the driver and its JVM, mid-stream
    victim.wait()
    committed = len(list(log_dir.glob("*.json")))
    assert 3 <= committed < n_events / 500, "the kill must land part-way through the run"

    ingest_topics(spark, lakehouse, bootstrap_servers=platform.kafka_bootstrap_servers, topics=[events])
    bronze = _bronze(spark, lakehouse, events)
    assert bronze.count() == n_events
    assert bronze.select("partition", "offset").distinct().count() == n_events


def test_every_bad_input_kind_is_quarantined_with_its_reason(spark, platform: Settings, isolated) -> None:  # type: ignore[no-untyped-def]
    lakehouse, events, labels = isolated
    options = GeneratorOptions(events=4000, seed=4, malformed_fraction=0.05,
                               duplicate_fraction=0.03, late_fraction=0.03)
    sent = [m for m in _send(platform, options, events, labels) if m.topic == TRANSACTIONS.topic]
    ingest_topics(spark, lakehouse, bootstrap_servers=platform.kafka_bootstrap_servers, topics=[events, labels])
    schema = dataclasses.replace(TRANSACTIONS, topic=events)
    gx_dir = Path(lakehouse.root) / "gx"
    summary = validate_topic(spark, lakehouse, schema, gx_dir=gx_dir)
    label_summary = validate_topic(spark, lakehouse, dataclasses.replace(CHARGEBACK_LABELS, topic=labels),
                                   gx_dir=gx_dir)

    quarantined = spark.read.format("delta").load(lakehouse.quarantine("transaction")).collect()
    quarantine = {(r["partition"], r["offset"]): list(r["reasons"]) for r in quarantined}
    bronze = {bytes(r["value"]): (r["partition"], r["offset"])
              for r in _bronze(spark, lakehouse, events).select("value", "partition", "offset").collect()}
    malformed = [m for m in sent if m.kind.startswith("malformed:")]
    assert {m.kind.split(":", 1)[1] for m in malformed} == {
        "malformed_json", "missing", "wrong_type", "out_of_range", "unknown_field", "not_allowed", "bad_timestamp"}
    for message in malformed:
        reasons = quarantine[bronze[message.value]]
        assert [r.split(":")[0] for r in reasons] == [message.kind.split(":", 1)[1]], (message, reasons)

    duplicates = [m for m in sent if m.kind == "duplicate"]
    assert duplicates and summary.duplicates == len(duplicates)
    assert sum(1 for r in quarantine.values() if r == ["duplicate:event_id"]) == len(duplicates)

    silver = spark.read.format("delta").load(lakehouse.silver("transaction"))
    valid_ids = {m.event_id for m in sent if m.kind in ("valid", "late")}
    assert {r["event_id"] for r in silver.select("event_id").collect()} == valid_ids
    assert silver.count() == len(valid_ids)  # deduplicated
    # nothing is dropped: every bronze record is in silver or quarantine
    assert summary.bronze_rows == len(sent) == silver.count() + len(quarantine)
    assert label_summary.quarantined == 0 and label_summary.silver_rows == len(valid_ids)
    # Great Expectations, run on the same slice, counts what the quarantine holds
    per_row: dict[str, int] = {}
    for row in quarantined:
        for name in row["failed_expectations"]:
            per_row[name] = per_row.get(name, 0) + 1
    unique = "expect_compound_columns_to_be_unique:user_id,event_id"
    assert {k: v for k, v in summary.failed_expectations.items() if k != unique} == {
        k: v for k, v in per_row.items() if k != unique}
    assert summary.failed_expectations[unique] >= per_row[unique]  # GE counts the first copy too
    assert Path(summary.data_docs.removeprefix("file://")).is_file()
    # a rerun over the same bronze adds nothing
    assert validate_topic(spark, lakehouse, schema, gx_dir=gx_dir).bronze_rows == 0


def test_later_slices_route_each_record_to_exactly_one_place(spark, platform: Settings, isolated) -> None:  # type: ignore[no-untyped-def]
    """A second validation run (a new bronze slice holding new records and re-sends of old
    ones) puts each record in silver or quarantine, never both: duplicates are judged
    against silver as it was, not against this slice's own silver rows."""
    lakehouse, events, labels = isolated
    schema = dataclasses.replace(TRANSACTIONS, topic=events)
    gx_dir = Path(lakehouse.root) / "gx"
    first = [m for m in _send(platform, GeneratorOptions(events=1500, seed=31), events, labels)
             if m.topic == TRANSACTIONS.topic]
    ingest_topics(spark, lakehouse, bootstrap_servers=platform.kafka_bootstrap_servers, topics=[events])
    validate_topic(spark, lakehouse, schema, gx_dir=gx_dir)

    second = [m for m in _send(platform, GeneratorOptions(events=1500, seed=32), events, labels)
              if m.topic == TRANSACTIONS.topic]
    resent = [m for m in first if m.kind == "valid"][:100]
    kafka = producer(platform.kafka_bootstrap_servers)
    for message in resent:
        kafka.send(events, key=message.key, value=message.value)
    kafka.flush()
    kafka.close()
    ingest_topics(spark, lakehouse, bootstrap_servers=platform.kafka_bootstrap_servers, topics=[events])
    summary = validate_topic(spark, lakehouse, schema, gx_dir=gx_dir)

    silver = {(r["partition"], r["offset"]): r["event_id"] for r in spark.read.format("delta").load(
        lakehouse.silver("transaction")).select("partition", "offset", "event_id").collect()}
    quarantine = {(r["partition"], r["offset"]): list(r["reasons"]) for r in spark.read.format(
        "delta").load(lakehouse.quarantine("transaction")).collect()}
    bronze = _bronze(spark, lakehouse, events).count()
    assert not set(silver) & set(quarantine)
    assert len(silver) + len(quarantine) == bronze == len(first) + len(second) + len(resent)
    valid_ids = {m.event_id for m in first + second if m.kind in ("valid", "late")}
    assert sorted(silver.values()) == sorted(valid_ids)
    expected_duplicates = sum(1 for m in second if m.kind == "duplicate") + len(resent)
    assert summary.duplicates == expected_duplicates
    assert summary.silver_rows == len({m.event_id for m in second if m.kind in ("valid", "late")})


def test_a_slice_over_the_failure_rate_stays_blocked_until_accepted(spark, platform: Settings, isolated) -> None:  # type: ignore[no-untyped-def]
    """The gate judges a slice before anything of it is written, so the DAG's retry meets the
    same slice and fails with the same numbers; `accept` lets it through."""
    import re

    from batch.validate import accept_slice
    from lakehouse.errors import DataQualityError

    lakehouse, events, labels = isolated
    sent = [m for m in _send(platform, GeneratorOptions(events=1000, seed=51, malformed_fraction=0.12),
                             events, labels) if m.topic == TRANSACTIONS.topic]
    ingest_topics(spark, lakehouse, bootstrap_servers=platform.kafka_bootstrap_servers, topics=[events])
    schema = dataclasses.replace(TRANSACTIONS, topic=events)
    gx_dir = Path(lakehouse.root) / "gx"
    refusals = []
    for _ in range(2):  # the run, then its retry
        with pytest.raises(DataQualityError) as refused:
            validate_topic(spark, lakehouse, schema, gx_dir=gx_dir, max_failure_rate=0.05)
        refusals.append(str(refused.value))
    assert refusals[0] == refusals[1]
    invalid = sum(1 for m in sent if m.kind.startswith("malformed:"))
    assert f"has {invalid} of {len(sent)} records invalid" in refusals[0]
    from deltalake import DeltaTable

    for path in (lakehouse.silver("transaction"), lakehouse.quarantine("transaction")):
        assert not DeltaTable.is_deltatable(path)  # nothing of the slice was written
    slice_id = re.search(r"lambdalake batch accept (\S+)`", refusals[0]).group(1)  # type: ignore[union-attr]
    accept_slice(lakehouse, slice_id, accepted_by="test", note="known producer bug")
    summary = validate_topic(spark, lakehouse, schema, gx_dir=gx_dir, max_failure_rate=0.05)
    duplicates = sum(1 for m in sent if m.kind == "duplicate")
    assert summary.bronze_rows == len(sent) and summary.duplicates == duplicates
    assert summary.quarantined == invalid + duplicates
