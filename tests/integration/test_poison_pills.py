"""Poison pills on the real platform: every kind of hostile record mixed into 10,000 valid
events. The speed layer (its own process) scores every valid event exactly once and keeps
running; the batch layer puts every valid event in silver; every bad record is in the DLQ
and in quarantine, each once, with the same reasons in both layers."""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batch.ingest import ingest_topics
from batch.validate import validate_topic
from lakehouse.config import Settings
from lakehouse.streams import producer
from tests.integration.streams import (
    new_stream,
    read_dlq,
    scored_count,
    scored_or_empty,
    serve_champion,
    speed_process,
    wait_for,
)

pytestmark = pytest.mark.integration

BIG = 900_000  # fits the broker's 1 MB limit; larger than the DLQ keeps (512 KiB)


@pytest.fixture(scope="module")
def served(ray_cluster: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    yield from serve_champion(ray_cluster, tmp_path_factory.mktemp("bundles"))


def poison(template: dict[str, Any], key: bytes) -> list[tuple[bytes | None, bytes | None, list[str]]]:
    """(Kafka key, value, the reasons both layers must give) of every hostile kind."""
    def event(n: int, **change: Any) -> dict[str, Any]:
        return {**template, "event_id": f"poison-{n}", **change}

    def raw(document: dict[str, Any]) -> bytes:
        return json.dumps(document).encode()

    return [
        (key, b"[" * 5000, ["too_deep"]),
        (key, b'{"event_id": "poison-1", "amount": ' + b"7" * 5000 + b"}", ["number_too_long"]),
        (key, b"9" * 5000, ["number_too_long"]),
        (key, raw(event(2))[:-2] + b"\xff\xfe}", ["invalid_utf8"]),
        (key, b"\x00" + raw(event(3)), ["malformed_json: Expecting value at 0"]),
        (key, b"[1, 2, 3]", ["not_an_object"]),
        (key, b'"a string"', ["not_an_object"]),
        (key, raw(event(4))[:-1] + b', "event_id": "poison-4b"}', ["duplicate_key:event_id"]),
        (key, None, ["missing_value"]),
        (b"somebody-else", raw(event(5)), ["key_mismatch:user_id"]),
        (None, raw(event(6)), ["missing_key:user_id"]),
        (key, raw(event(7, event_time="9999-12-31T23:59:59.000Z")), ["out_of_range_time:event_time"]),
        (key, raw(event(8, merchant_id="\ud800")), ["invalid_string:merchant_id"]),
        (key, raw(event(9, event_id="x" * BIG)), ["too_long:event_id"]),
    ]


def test_hostile_records_stop_neither_layer_and_are_kept_with_their_reasons(served: Settings, spark: Any) -> None:
    stream = new_stream(served, 10_000, seed=61, malformed_fraction=0.0, duplicate_fraction=0.0)
    valid = [m for m in stream.messages if m.kind in ("valid", "late")]
    assert len(valid) == len(stream.valid_ids) == 10_000
    pills = poison(json.loads(valid[0].value), valid[0].key)
    # deduplication has one scope in both layers, (key entity, event id): a re-send is a
    # duplicate for both; the same id under another user is a different event for both
    pills.append((valid[1].key, valid[1].value, ["duplicate:event_id"]))
    same_id = {**json.loads(valid[2].value), "user_id": "another-user"}
    also_valid = [(b"another-user", json.dumps(same_id).encode())]
    expected_ids = Counter(stream.valid_ids) + Counter([same_id["event_id"]])
    kafka = producer(stream.settings.kafka_bootstrap_servers, max_request_size=2 * 1024 * 1024)
    step = len(valid) // len(pills)
    for i, message in enumerate(valid):
        kafka.send(stream.topic, key=message.key, value=message.value)
        if i % step == step // 2 and i // step < len(pills):
            key, value, _ = pills[i // step]
            kafka.send(stream.topic, key=key, value=value)
    for key, value in also_valid:
        kafka.send(stream.topic, key=key, value=value)
    kafka.flush()
    kafka.close()

    process = speed_process(stream, "poison")

    def running(done: Any) -> Any:
        def check() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"the speed layer stopped: {process.communicate()[1][-4000:]}")
            return bool(done())
        return check

    try:
        wait_for(running(lambda: scored_count(stream) >= len(valid) + len(also_valid)), timeout=300)
        wait_for(running(lambda: len(read_dlq(stream)) >= len(pills)), timeout=60)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-3000:]

    rows = scored_or_empty(stream)
    assert Counter(r["event_id"] for r in rows) == expected_ids  # each exactly once
    dlq = read_dlq(stream)
    assert len(dlq) == len(pills)
    by_source = Counter((int(dict(r.headers)["source_partition"]), int(dict(r.headers)["source_offset"]))
                        for r in dlq)
    assert set(by_source.values()) == {1}  # each bad record reached the DLQ once
    dlq_reasons = {(int(dict(r.headers)["source_partition"]), int(dict(r.headers)["source_offset"])):
                   dict(r.headers)["reason"].decode() for r in dlq}
    truncated = [r for r in dlq if dict(r.headers).get("original_size")]
    assert len(truncated) == 1 and len(truncated[0].value) == 524_288
    big_size = int(dict(truncated[0].headers)["original_size"])
    assert big_size > BIG
    expected = ["; ".join(reasons) for _, _, reasons in pills]
    big = next(i for i, (_, _, reasons) in enumerate(pills) if reasons == ["too_long:event_id"])
    expected[big] += (f"; dlq_truncated: the value kept its first 524288 of {big_size} bytes "
                      "(bronze holds it whole)")
    assert sorted(dlq_reasons.values()) == sorted(expected)

    # the batch layer: the same records, the same reasons, nothing dropped, nothing stopped
    ingest_topics(spark, stream.lakehouse, bootstrap_servers=stream.settings.kafka_bootstrap_servers,
                  topics=[stream.topic])
    summary = validate_topic(spark, stream.lakehouse, stream.spec.events,
                             gx_dir=Path(stream.lakehouse.root) / "gx",
                             max_failure_rate=stream.settings.batch_max_failure_rate)
    assert summary.bronze_rows == len(valid) + len(pills) + len(also_valid)
    silver = spark.read.format("delta").load(stream.lakehouse.silver(stream.spec.events.name))
    assert Counter(r["event_id"] for r in silver.select("event_id").collect()) == expected_ids
    quarantine = {(r["partition"], r["offset"]): "; ".join(r["reasons"]) for r in spark.read.format("delta")
                  .load(stream.lakehouse.quarantine(stream.spec.events.name)).collect()}
    assert set(quarantine) == set(dlq_reasons)
    for source, reason in dlq_reasons.items():
        assert reason.split("; dlq_truncated")[0] == quarantine[source], source
    bronze = spark.read.format("delta").load(stream.lakehouse.bronze(stream.topic))
    kept = bronze.where(f"length(value) = {big_size}").count()
    assert kept == 1  # bronze keeps the original bytes of the value the DLQ truncated
