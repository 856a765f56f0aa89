"""Batch layer benchmark, at two sizes:
- batch views: `compute_views` against a bare Spark read + groupBy of the same silver table,
  run side by side; prints times, the ratio and t(large)/t(small);
- training sets (issue 13): with `--scored-fraction F` (default 0.5) the last fraction F of
  the valid events also get rows in `speed/scored_events`, as one speed group ("bench")
  would have scored them: micro-batches of 200 consecutive events in generation order, each
  row's coverage vector = per partition the highest offset of the events before its
  micro-batch, and for the event's own partition its offset - 1. `build_training_set` is
  timed as of those vectors (group "bench") and without them (group None: every event in
  arrival order), beside the views on the same data, with the ratios training set / views;
- training (unless `--no-train`): TorchDistributor training on the training set (as of the
  vectors when there are scored rows) and the holdout ROC AUC beside the Bayes-optimal AUC
  of the generator's true probabilities on the same rows.

Silver events and labels are built straight from the generator (parsed with the spec,
written with deltalake; `arrival_clock` = the Kafka timestamp, as validation gives events
without duplicates), and so are the scored rows, so the figures measure the batch layer, not
Kafka or the speed layer. Training needs the MLflow server of `lambdalake up`; views and
training sets need nothing running. Run (it takes long at 10M):

    .venv/bin/python -m tests.benchmarks.batch_layer --sizes 1000000 10000000
    # issue 13's figure: training set as of each scored event's vector vs the views, at 1M
    .venv/bin/python -m tests.benchmarks.batch_layer --sizes 1000000 --no-train
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from deltalake import CommitProperties, Transaction, write_deltalake
from kafka.partitioner.default import murmur2

from batch.train import TrainOptions, train_model
from batch.training_set import TrainingSet, build_training_set
from batch.validate import LINEAGE, parsed_arrow_schema
from batch.views import compute_views
from lakehouse.config import load_settings
from lakehouse.dedup import CLOCK
from lakehouse.fraud import CHARGEBACK_LABELS, FRAUD_SPEC, TRANSACTIONS
from lakehouse.generator import GeneratorOptions, generate
from lakehouse.scored import app_id, scored_schema
from lakehouse.spark import spark_session
from lakehouse.tables import EVENT_TIME_MS, Lakehouse

CHUNK = 200_000
GROUP = "bench"  # the speed group of the synthetic scored_events
MICRO_BATCH = 200


def build_silver(lakehouse: Lakehouse, events: int, partitions: int = 4,
                 scored_fraction: float = 0.0) -> np.ndarray:
    """Valid generated transactions and their labels as silver tables, and the events'
    offsets as a bronze table; with `scored_fraction` > 0, the last fraction of the
    transactions (in generation order) also as group GROUP's rows of speed/scored_events
    (`_Scored`). Returns p_true by transaction number (tx-<seed>-<n>)."""
    tables = {TRANSACTIONS.name: _Chunks(lakehouse, TRANSACTIONS),
              CHARGEBACK_LABELS.name: _Chunks(lakehouse, CHARGEBACK_LABELS)}
    # every generated event message is a valid transaction here (no malformed, no duplicates)
    scored = _Scored(lakehouse, first=events - round(events * scored_fraction)) if scored_fraction > 0 else None
    offsets = {TRANSACTIONS.topic: [0] * partitions, CHARGEBACK_LABELS.topic: [0] * partitions}
    p_true = np.full(events, np.nan)
    started = time.monotonic()
    options = GeneratorOptions(events=events, seed=7, malformed_fraction=0, duplicate_fraction=0)
    for message in generate(options):
        schema = TRANSACTIONS if message.topic == TRANSACTIONS.topic else CHARGEBACK_LABELS
        record = schema.parse(message.value)
        # the Java client's partition for the key, as Kafka would have assigned it
        partition = (murmur2(message.key) & 0x7FFFFFFF) % partitions
        topic_offsets = offsets[schema.topic]
        record.update(topic=schema.topic, partition=partition, offset=topic_offsets[partition],
                      kafka_timestamp=message.sent_ms * 1000, ingest_time=message.sent_ms * 1000)
        record[CLOCK] = record["kafka_timestamp"]  # no duplicates: each event's clock is its timestamp
        record[schema.time_field] *= 1000
        if schema is TRANSACTIONS:
            p_true[int(message.event_id.rsplit("-", 1)[1])] = message.p_true
            if scored is not None:
                scored.add(record, topic_offsets)  # the offsets before this event
        topic_offsets[partition] += 1
        tables[schema.name].add(record)
    for chunks in tables.values():
        chunks.flush()
    if scored is not None:
        scored.close()
        print(f"scored_events: {scored.written:,} rows of group {GROUP!r} (the last "
              f"{scored_fraction:g} of {scored.seen:,} events, micro-batches of {MICRO_BATCH}) "
              f"written in {scored.seconds:.1f}s", flush=True)
    last = offsets[TRANSACTIONS.topic]
    bronze = pa.table({"partition": pa.array(range(partitions), pa.int32()),
                       "offset": pa.array([o - 1 for o in last], pa.int64())})
    write_deltalake(lakehouse.bronze("events"), bronze, mode="overwrite")
    print(f"silver: {sum(last):,} events and {sum(offsets[CHARGEBACK_LABELS.topic]):,} labels "
          f"written in {time.monotonic() - started:.1f}s", flush=True)
    return p_true


class _Chunks:
    """Rows of one silver table, appended with deltalake every CHUNK rows."""

    def __init__(self, lakehouse: Lakehouse, schema) -> None:  # type: ignore[no-untyped-def]
        arrow = parsed_arrow_schema(schema)
        self.schema = pa.schema([*[arrow.field(n) for n in (*schema.field_names, *LINEAGE)],
                                 pa.field(CLOCK, pa.timestamp("us", tz="UTC"))])
        self.path = lakehouse.silver(schema.name)
        self.rows: list[dict] = []  # type: ignore[type-arg]

    def add(self, row: dict) -> None:  # type: ignore[type-arg]
        self.rows.append(row)
        if len(self.rows) == CHUNK:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            write_deltalake(self.path, pa.Table.from_pylist(self.rows, schema=self.schema), mode="append")
            self.rows.clear()


class _Scored:
    """Group GROUP's rows of speed/scored_events for the transactions numbered `first` on (in
    generation order), as a speed member taking micro-batches of MICRO_BATCH consecutive
    events would have written them: its store read at each micro-batch's start covers, per
    partition, the events before the micro-batch, and an event also sees its own partition's
    earlier offsets (`coverage` = that vector with the event's offset - 1 for its partition).
    Appended with deltalake every CHUNK rows; the last commit records one app transaction per
    partition (the last offset scored), as the speed layer's flushes do."""

    def __init__(self, lakehouse: Lakehouse, first: int) -> None:
        self.path = lakehouse.scored_events
        self.schema = scored_schema(FRAUD_SPEC)
        self.first = first
        self.features = [0.0] * len(FRAUD_SPEC.feature_names)
        self.scored_at = int(time.time() * 1_000_000)
        self.read: dict[int, int] = {}  # the current micro-batch's store read: partition → offset
        self.last: dict[int, int] = {}  # partition → the last offset scored
        self.rows: list[dict[str, Any]] = []
        self.seen = self.written = 0
        self.seconds = 0.0

    def add(self, record: dict[str, Any], next_offsets: list[int]) -> None:
        """One typed transaction (partition, offset set); `next_offsets`: per partition, the
        next offset before this event."""
        number, self.seen = self.seen, self.seen + 1
        if number < self.first:
            return
        if (number - self.first) % MICRO_BATCH == 0:  # a micro-batch starts: one store read
            self.read = {p: o - 1 for p, o in enumerate(next_offsets)}
        partition, offset = record["partition"], record["offset"]
        self.last[partition] = offset
        self.rows.append({
            **record, "features": self.features, "score": 0.5, "model_version": 1,
            "coverage": sorted({**self.read, partition: offset - 1}.items()),
            "batch_run_id": None, "consumer_group": GROUP, "scored_at": self.scored_at,
            "feature_ms": 0.05, "model_ms": 1.0})
        if len(self.rows) == CHUNK:
            self.flush()

    def flush(self, transactions: list[Transaction] | None = None) -> None:
        if not self.rows and not transactions:
            return
        started = time.monotonic()
        write_deltalake(self.path, pa.Table.from_pylist(self.rows, schema=self.schema), mode="append",
                        commit_properties=CommitProperties(app_transactions=transactions) if transactions else None)
        self.seconds += time.monotonic() - started
        self.written += len(self.rows)
        self.rows.clear()

    def close(self) -> None:
        self.flush([Transaction(app_id=app_id(GROUP, TRANSACTIONS.topic, p), version=o)
                    for p, o in sorted(self.last.items())])


def bare_group_by(spark, lakehouse: Lakehouse) -> float:  # type: ignore[no-untyped-def]
    """The baseline: read silver and count/sum per user, nothing else."""
    started = time.monotonic()
    frame = spark.read.format("delta").load(lakehouse.silver(TRANSACTIONS.name))
    frame.groupBy("user_id").agg({"amount": "sum", "*": "count"}).write.format("noop").mode(
        "overwrite").save()
    return time.monotonic() - started


def training_sets(spark, lakehouse: Lakehouse, run) -> tuple[tuple[TrainingSet, float], tuple[TrainingSet, float]]:  # type: ignore[no-untyped-def]
    """The training set as of the scored events' coverage vectors (group GROUP), then the
    one without them (every event in arrival order), each with its seconds."""
    out = []
    for group in (GROUP, None):
        started = time.monotonic()
        training_set = build_training_set(spark, lakehouse, FRAUD_SPEC, run, group=group)
        out.append((training_set, time.monotonic() - started))
    return out[0], out[1]


def train(spark, settings, lakehouse: Lakehouse, run, p_true: np.ndarray, size: int,  # type: ignore[no-untyped-def]
          built: tuple[TrainingSet, float] | None = None) -> str:
    """Training set (unless `built` gives it, with its seconds), training and AUCs for one
    size; returns the report line."""
    from sklearn.metrics import roc_auc_score

    if built is None:
        started = time.monotonic()
        plain = build_training_set(spark, lakehouse, FRAUD_SPEC, run)
        built = plain, time.monotonic() - started
    training_set, seconds = built
    settings = settings.model_copy(update={"model_name": f"bench-{size}"})
    result = train_model(spark, settings, FRAUD_SPEC, lakehouse=lakehouse,
                         options=TrainOptions.from_settings(settings), training_set=training_set)
    rows = spark.read.format("delta").option("versionAsOf", training_set.version).load(
        training_set.path).where(f"{EVENT_TIME_MS} >= {result.split_time_ms}").select(
        "event_id", "label").collect()
    bayes = roc_auc_score([r["label"] for r in rows],
                          [p_true[int(r["event_id"].rsplit("-", 1)[1])] for r in rows])
    return (f"training set {seconds:6.1f}s ({training_set.rows:,} labelled events) | "
            f"TorchDistributor training {result.durations_s['train']:6.1f}s "
            f"({result.training_set['train_rows']:,} rows, {TrainOptions.from_settings(settings).epochs} epochs) | "
            f"holdout ROC AUC {result.metrics['roc_auc']:.4f} vs Bayes-optimal {bayes:.4f} "
            f"({len(rows):,} events)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--no-train", action="store_true",
                        help="no torch training (the training sets are still built with --scored-fraction > 0)")
    parser.add_argument("--scored-fraction", type=float, default=0.5,
                        help="the last fraction of the events that speed group 'bench' scored "
                             "(speed/scored_events rows with coverage vectors); 0: none")
    args = parser.parse_args()
    if not 0 <= args.scored_fraction <= 1:
        parser.error("--scored-fraction: a number in [0, 1]")
    settings = load_settings()
    spark = spark_session(settings, app_name="lambdalake-bench")
    results: dict[int, tuple[float, ...]] = {}
    for size in [20_000, *args.sizes]:  # the first, small size warms the JVM up; not reported
        root = Path(tempfile.mkdtemp(prefix=f"bench-{size}-", dir=settings.state_path))
        lakehouse = Lakehouse(str(root))
        p_true = build_silver(lakehouse, size, scored_fraction=args.scored_fraction)
        bare = bare_group_by(spark, lakehouse)
        started = time.monotonic()
        run = compute_views(spark, lakehouse, FRAUD_SPEC)
        views = time.monotonic() - started
        built = training_sets(spark, lakehouse, run) if args.scored_fraction > 0 else None
        warmup = size == 20_000 and not results and size not in args.sizes
        if not warmup:
            results[size] = (views, bare, *((built[0][1], built[1][1]) if built else ()))
            print(f"{size:>12,} events: views {views:7.1f}s ({len(FRAUD_SPEC.views)} views, "
                  f"{run.row_counts['events']:,} valid events) | bare read+groupBy {bare:6.1f}s | "
                  f"ratio {views / bare:5.2f}", flush=True)
            if built:
                (vectored, t_vectored), (plain, t_plain) = built
                print(f"{size:>12,} events: training set as of the vectors {t_vectored:7.1f}s "
                      f"({vectored.rows:,} labelled events; {args.scored_fraction:g} of the events scored) | "
                      f"without vectors (group=None) {t_plain:7.1f}s ({plain.rows:,}) | "
                      f"training set / views: {t_vectored / views:5.2f} as of the vectors, "
                      f"{t_plain / views:5.2f} without", flush=True)
            if not args.no_train:
                print(f"{size:>12,} events: "
                      f"{train(spark, settings, lakehouse, run, p_true, size, built[0] if built else None)}",
                      flush=True)
        shutil.rmtree(root, ignore_errors=True)
    if len(results) >= 2:
        small, large = min(results), max(results)
        growth = [results[large][i] / results[small][i] for i in range(len(results[large]))]
        print(f"t({large:,}) / t({small:,}) = {growth[0]:.2f} for views, {growth[1]:.2f} for the bare baseline"
              + (f", {growth[2]:.2f} for the training set as of the vectors, {growth[3]:.2f} without them"
                 if len(growth) == 4 else ""))


if __name__ == "__main__":
    main()
