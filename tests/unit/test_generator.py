"""The transaction generator: deterministic, valid where it claims to be, broken exactly as it
claims to be, and carrying a fraud signal that the model inputs can see."""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from kafka.errors import KafkaTimeoutError
from sklearn.metrics import roc_auc_score

from lakehouse.errors import ConfigError, ServiceError, ValidationError
from lakehouse.fraud import CHARGEBACK_LABELS, FRAUD_SPEC, TRANSACTIONS, USER_10M
from lakehouse.generator import (
    DEFAULT_START_MS,
    HOUR_MS,
    MALFORMED_KINDS,
    TRUTH_SCHEMA,
    GeneratorOptions,
    Message,
    fraud_probability,
    generate,
    generate_and_produce,
    produce,
    write_truth,
)
from lakehouse.generator.simulation import _DueQueue
from lakehouse.spec import format_timestamp_ms
from tests.oracle import fraud_model_inputs, point_in_time_states

NOISY = dict(malformed_fraction=0.02, duplicate_fraction=0.02, late_fraction=0.03)


@pytest.fixture(scope="module")
def stream() -> list[Message]:
    """50k events with more noise than the defaults, so every kind shows up often."""
    return list(generate(GeneratorOptions(events=50_000, seed=7, **NOISY)))


@pytest.fixture(scope="module")
def transactions(stream: list[Message]) -> list[Message]:
    return [m for m in stream if m.kind in ("valid", "late")]


def events_of(stream: list[Message]) -> list[Message]:
    return [m for m in stream if m.topic == "events"]


def test_same_seed_same_bytes_in_the_same_order() -> None:
    options = GeneratorOptions(events=3_000, seed=11, **NOISY)
    first = [(m.topic, m.key, m.value, m.kind, m.seq, m.sent_ms) for m in generate(options)]
    again = [(m.topic, m.key, m.value, m.kind, m.seq, m.sent_ms) for m in generate(options)]
    assert first == again
    other = [(m.topic, m.key, m.value, m.kind) for m in generate(replace(options, seed=12))]
    assert other != [row[:4] for row in first]
    valid = {row[2] for row in first if row[3] == "valid"}
    assert not valid & {row[2] for row in other if row[3] == "valid"}  # ids carry the seed


def test_exactly_the_requested_number_of_events_in_send_order(stream: list[Message]) -> None:
    assert len(events_of(stream)) == 50_000
    assert [m.seq for m in stream] == list(range(len(stream)))
    sent = [m.sent_ms for m in stream]
    assert sent == sorted(sent)
    assert sent[0] >= DEFAULT_START_MS
    on_time = [m.event_time_ms for m in stream if m.kind == "valid"]
    assert all(a < b for a, b in zip(on_time, on_time[1:], strict=False))  # strictly increasing clock


def test_every_message_is_keyed_by_its_user(stream: list[Message]) -> None:
    assert all(m.key == m.user_id.encode() for m in stream)
    assert {m.topic for m in stream} == {TRANSACTIONS.topic, CHARGEBACK_LABELS.topic}


def test_valid_and_late_events_parse_and_match_their_truth(transactions: list[Message]) -> None:
    for m in transactions:
        record = TRANSACTIONS.parse(m.value)
        assert record["event_id"] == m.event_id
        assert record["user_id"] == m.user_id
        assert record["event_time"] == m.event_time_ms
        assert f'"event_time":"{format_timestamp_ms(m.event_time_ms)}"'.encode() in m.value
        assert 0.0 < m.p_true < 1.0 and m.is_fraud is not None
    assert len({m.event_id for m in transactions}) == len(transactions)


def test_one_label_per_transaction_sent_after_it(stream: list[Message],
                                                  transactions: list[Message]) -> None:
    labels = [m for m in stream if m.topic == "labels"]
    assert all(m.kind == "label" for m in labels)
    sent_at = {m.event_id: m for m in transactions}
    assert sorted(m.event_id for m in labels) == sorted(sent_at)
    for label in labels:
        record = CHARGEBACK_LABELS.parse(label.value)
        event = sent_at[record["event_id"]]
        assert record["user_id"] == event.user_id
        assert record["is_fraud"] is event.is_fraud is label.is_fraud
        assert record["label_time"] == label.label_time_ms == event.label_time_ms
        assert HOUR_MS <= record["label_time"] - event.event_time_ms <= 48 * HOUR_MS
        assert record["label_time"] > event.sent_ms
        assert label.seq > event.seq and label.sent_ms == record["label_time"]


def test_malformed_messages_fail_for_the_reason_they_claim(stream: list[Message]) -> None:
    malformed = [m for m in stream if m.kind.startswith("malformed:")]
    counts = Counter(m.kind for m in malformed)
    assert set(counts) == {f"malformed:{kind}" for kind in MALFORMED_KINDS}
    assert max(counts.values()) - min(counts.values()) <= 1  # the kinds take turns
    for m in malformed:
        with pytest.raises(ValidationError) as error:
            TRANSACTIONS.parse(m.value)
        assert len(error.value.reasons) == 1, (m.value, error.value.reasons)
        assert error.value.reasons[0].split(":")[0] == m.kind.removeprefix("malformed:")
        assert math.isnan(m.p_true) and m.is_fraud is None and m.label_time_ms is None
        if m.kind == "malformed:malformed_json":
            assert m.event_id is None


def test_duplicates_resend_an_earlier_event_byte_for_byte(stream: list[Message]) -> None:
    first_seen: dict[tuple[bytes, bytes], Message] = {}
    duplicates = 0
    for m in stream:
        if m.kind in ("valid", "late"):
            first_seen.setdefault((m.key, m.value), m)
        elif m.kind == "duplicate":
            original = first_seen[(m.key, m.value)]
            assert original.seq < m.seq and original.event_id == m.event_id
            assert math.isnan(m.p_true) and m.is_fraud is None
            duplicates += 1
    assert duplicates > 0


def test_late_events_are_sent_hours_after_their_time(stream: list[Message]) -> None:
    options = GeneratorOptions(events=1)
    latest_sent = 0
    overtaken = 0
    for m in events_of(stream):
        lateness = m.sent_ms - m.event_time_ms
        if m.kind == "late":
            assert options.late_min_ms <= lateness <= options.late_max_ms
            overtaken += m.event_time_ms < latest_sent
        elif m.kind == "valid":
            assert lateness == 0
        latest_sent = max(latest_sent, m.event_time_ms)
    assert overtaken > 1000  # arrive after events made later than they were


def test_fractions_are_roughly_respected(stream: list[Message]) -> None:
    kinds = Counter(m.kind.split(":")[0] for m in events_of(stream))
    for kind, fraction in (("malformed", 0.02), ("duplicate", 0.02), ("late", 0.03)):
        assert kinds[kind] == pytest.approx(50_000 * fraction, rel=0.15), kinds


def test_no_noise_when_fractions_are_zero() -> None:
    options = GeneratorOptions(events=2_000, seed=1, malformed_fraction=0.0,
                               duplicate_fraction=0.0, late_fraction=0.0)
    kinds = Counter(m.kind for m in generate(options))
    assert kinds == {"valid": 2_000, "label": 2_000}


def test_all_malformed_is_allowed() -> None:
    options = GeneratorOptions(events=70, malformed_fraction=1.0, duplicate_fraction=0.0,
                               late_fraction=0.0)
    kinds = Counter(m.kind for m in generate(options))
    assert kinds == {f"malformed:{kind}": 10 for kind in MALFORMED_KINDS}


def test_planted_signal_gives_a_high_bayes_auc(transactions: list[Message]) -> None:
    p_true = np.array([m.p_true for m in transactions])
    labels = np.array([m.is_fraud for m in transactions])
    assert 0.01 <= labels.mean() <= 0.03
    assert p_true[labels].mean() > 20 * p_true[~labels].mean()
    assert roc_auc_score(labels, p_true) >= 0.93


def test_compromised_cards_burst(transactions: list[Message]) -> None:
    """The hidden state shows in what the features can see: velocity and amount."""
    recent: dict[str, list[int]] = defaultdict(list)
    velocity: dict[bool, list[int]] = {True: [], False: []}
    for m in sorted(transactions, key=lambda m: m.event_time_ms):
        start = USER_10M.window_buckets_of(m.event_time_ms).start
        velocity[m.compromised].append(sum(t >= start for t in recent[m.user_id]))
        recent[m.user_id].append(m.event_time_ms)
    hidden, legit = np.array(velocity[True]), np.array(velocity[False])
    assert len(hidden) > 500
    assert (hidden >= 2).mean() > 0.4 > 0.05 > (legit >= 2).mean()
    p_hidden = np.mean([m.p_true for m in transactions if m.compromised])
    p_legit = np.mean([m.p_true for m in transactions if not m.compromised])
    assert p_hidden > 10 * p_legit


def point_in_time_features(records: list[dict[str, Any]]) -> Iterator[dict[str, float]]:
    """The model inputs of each record from the earlier records (in the order given), by the
    test oracle: plain states and inputs written out by hand, not the spec's fold."""
    states = point_in_time_states(FRAUD_SPEC.views, records, TRANSACTIONS.time_field)
    for record, before in zip(records, states, strict=True):
        yield fraud_model_inputs(before, record)


def test_p_true_is_a_function_of_the_model_inputs() -> None:
    """What the platform computes from the valid events alone gives back p_true exactly:
    the Bayes-optimal score is within reach of a model on MODEL_INPUTS."""
    messages = [m for m in generate(GeneratorOptions(events=6_000, seed=5, **NOISY))
                if m.kind in ("valid", "late")]
    records = sorted((TRANSACTIONS.parse(m.value) for m in messages),
                     key=lambda r: r["event_time"])
    truth = {m.event_id: m.p_true for m in messages}
    for record, features in zip(records, point_in_time_features(records), strict=True):
        assert fraud_probability(features) == truth[record["event_id"]]


@pytest.mark.parametrize("steps_ms", [(1, 2, 500, 30_000), (HOUR_MS, 20 * HOUR_MS)])
def test_due_queue_pops_in_due_order(steps_ms: tuple[int, ...]) -> None:
    """The calendar queue behind labels and late events sends exactly what a heap would,
    whether the clock creeps (dense minutes) or jumps hours (sparse minutes)."""
    rng = random.Random(4)
    queue = _DueQueue(0)
    reference: list[tuple[int, int]] = []
    popped: list[tuple[Any, ...]] = []
    expected: list[tuple[int, int]] = []
    now = 0
    for tie in range(20_000):
        now += rng.choice(steps_ms)
        popped.extend(queue.pop_due(now))
        while reference and reference[0][0] <= now:
            expected.append(heapq.heappop(reference))
        entry = (now + rng.randrange(1, 48 * HOUR_MS), tie)
        queue.push(entry)
        heapq.heappush(reference, entry)
    assert len(queue) == len(reference)
    popped.extend(queue.drain())
    expected.extend(heapq.heappop(reference) for _ in range(len(reference)))
    assert popped == expected and len(queue) == 0


def test_truth_parquet_has_one_row_per_event(tmp_path: Path) -> None:
    options = GeneratorOptions(events=4_000, seed=3, **NOISY)
    messages = list(generate(options))
    path = tmp_path / "truth" / "truth.parquet"
    assert write_truth(iter(messages), path) == 4_000
    table = pq.read_table(path)
    assert table.schema.equals(TRUTH_SCHEMA)
    rows = table.to_pylist()
    events = events_of(messages)
    assert [r["seq"] for r in rows] == [m.seq for m in events]
    for row, m in zip(rows, events, strict=True):
        assert row["kind"] == m.kind and row["event_id"] == m.event_id
        assert row["user_id"] == m.user_id and row["event_time_ms"] == m.event_time_ms
        assert row["is_fraud"] is m.is_fraud
        if m.kind in ("valid", "late"):
            assert row["p_true"] == m.p_true and row["label_time_ms"] == m.label_time_ms
        else:
            assert math.isnan(row["p_true"]) and row["is_fraud"] is None


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (dict(events=0), "events"),
        (dict(events=True), "events"),
        (dict(events=10, seed=-1), "seed"),
        (dict(events=10, malformed_fraction=1.5), "malformed_fraction"),
        (dict(events=10, duplicate_fraction=float("nan")), "duplicate_fraction"),
        (dict(events=10, malformed_fraction=0.5, late_fraction=0.6), "late_fraction"),
        (dict(events=10, mean_gap_ms=0), "mean_gap_ms"),
        (dict(events=10, users=0), "users"),
        (dict(events=10, merchants=2.5), "merchants"),
        (dict(events=10, late_min_ms=10, late_max_ms=5), "late_min_ms"),
        (dict(events=10, label_delay_min_ms=0), "label_delay_min_ms"),
        (dict(events=10, start_ms="2026-01-01"), "start_ms"),
    ],
)
def test_bad_options_say_what_to_fix(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        GeneratorOptions(**options)


class FakeFuture:
    def __init__(self, error: BaseException | None) -> None:
        self.error = error

    def add_errback(self, callback: Any) -> None:
        if self.error is not None:
            callback(self.error)


class FakeProducer:
    def __init__(self, fail_every: int = 0, refuse_at: int = -1) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None]] = []
        self.flushed = False
        self.fail_every = fail_every
        self.refuse_at = refuse_at

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> FakeFuture:
        if len(self.sent) == self.refuse_at:
            raise KafkaTimeoutError("metadata not available")
        self.sent.append((topic, key, value))
        failing = self.fail_every and len(self.sent) % self.fail_every == 0
        return FakeFuture(RuntimeError("not acknowledged") if failing else None)

    def flush(self, timeout: float | None = None) -> None:
        self.flushed = True


def test_produce_sends_everything_and_counts_it() -> None:
    messages = list(generate(GeneratorOptions(events=500, seed=2, **NOISY)))
    producer = FakeProducer()
    summary = produce(iter(messages), producer=producer, progress=True, total_events=500)
    assert producer.sent == [(m.topic, m.key, m.value) for m in messages] and producer.flushed
    assert summary.messages == len(messages)
    assert summary.by_topic["events"] == 500
    assert summary.by_kind == dict(Counter(m.kind for m in messages))
    assert summary.rate > 0


def test_generate_and_produce_writes_the_truth_of_what_it_sent(tmp_path: Path) -> None:
    options = GeneratorOptions(events=300, seed=9, **NOISY)
    producer = FakeProducer()
    summary = generate_and_produce(options, producer=producer, truth_path=tmp_path / "t.parquet")
    truth = pq.read_table(tmp_path / "t.parquet")
    assert truth.num_rows == summary.by_topic["events"] == 300
    sent_events = [value for topic, _, value in producer.sent if topic == "events"]
    assert len(sent_events) == 300 and summary.messages == len(producer.sent)

    refusing = FakeProducer(refuse_at=100)
    with pytest.raises(ServiceError):
        generate_and_produce(options, producer=refusing, truth_path=tmp_path / "cut.parquet")
    recorded = pq.read_table(tmp_path / "cut.parquet").column("seq").to_pylist()
    assert recorded == [seq for seq in range(100) if seq in set(truth.column("seq").to_pylist())]


def test_produce_paces_to_the_rate() -> None:
    messages = list(generate(GeneratorOptions(events=100, seed=2)))
    started = time.monotonic()
    summary = produce(messages[:150], producer=FakeProducer(), rate=1_000.0)
    assert time.monotonic() - started >= 0.13 and summary.elapsed_s >= 0.13
    with pytest.raises(ConfigError, match="rate"):
        produce(messages, producer=FakeProducer(), rate=0)


def test_produce_reports_kafka_failures() -> None:
    messages = list(generate(GeneratorOptions(events=100, seed=2)))
    with pytest.raises(ServiceError, match="not acknowledged"):
        produce(messages, producer=FakeProducer(fail_every=10))
    with pytest.raises(ServiceError, match="after 5 were sent"):
        produce(messages, producer=FakeProducer(refuse_at=5))
