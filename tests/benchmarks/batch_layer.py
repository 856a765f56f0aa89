"""Batch layer benchmark, at two sizes:
- batch views: `compute_views` against a bare Spark read + groupBy of the same silver table,
  run side by side; prints times, the ratio and t(large)/t(small);
- training: the point-in-time training set, TorchDistributor training and the holdout ROC
  AUC beside the Bayes-optimal AUC of the generator's true probabilities on the same rows.

Silver events and labels are built straight from the generator (parsed with the spec,
written with deltalake), so the figures measure the batch layer, not Kafka. Training needs
the MLflow server of `lambdalake up`. Run (it takes long at 10M):

    .venv/bin/python -m tests.benchmarks.batch_layer --sizes 1000000 10000000
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from deltalake import write_deltalake
from kafka.partitioner.default import murmur2

from batch.train import TrainOptions, train_model
from batch.training_set import build_training_set
from batch.validate import LINEAGE, parsed_arrow_schema
from batch.views import compute_views
from lakehouse.config import load_settings
from lakehouse.fraud import CHARGEBACK_LABELS, FRAUD_SPEC, TRANSACTIONS
from lakehouse.generator import GeneratorOptions, generate
from lakehouse.spark import spark_session
from lakehouse.tables import EVENT_TIME_MS, Lakehouse

CHUNK = 200_000


def build_silver(lakehouse: Lakehouse, events: int, partitions: int = 4) -> np.ndarray:
    """Valid generated transactions and their labels as silver tables, and the events'
    offsets as a bronze table. Returns p_true by transaction number (tx-<seed>-<n>)."""
    tables = {TRANSACTIONS.name: _Chunks(lakehouse, TRANSACTIONS),
              CHARGEBACK_LABELS.name: _Chunks(lakehouse, CHARGEBACK_LABELS)}
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
        record[schema.time_field] *= 1000
        topic_offsets[partition] += 1
        if schema is TRANSACTIONS:
            p_true[int(message.event_id.rsplit("-", 1)[1])] = message.p_true
        tables[schema.name].add(record)
    for chunks in tables.values():
        chunks.flush()
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
        self.schema = pa.schema([arrow.field(n) for n in (*schema.field_names, *LINEAGE)])
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


def bare_group_by(spark, lakehouse: Lakehouse) -> float:  # type: ignore[no-untyped-def]
    """The baseline: read silver and count/sum per user, nothing else."""
    started = time.monotonic()
    frame = spark.read.format("delta").load(lakehouse.silver(TRANSACTIONS.name))
    frame.groupBy("user_id").agg({"amount": "sum", "*": "count"}).write.format("noop").mode(
        "overwrite").save()
    return time.monotonic() - started


def train(spark, settings, lakehouse: Lakehouse, run, p_true: np.ndarray, size: int) -> str:  # type: ignore[no-untyped-def]
    """Training set, training and AUCs for one size; returns the report line."""
    from sklearn.metrics import roc_auc_score

    started = time.monotonic()
    training_set = build_training_set(spark, lakehouse, FRAUD_SPEC, run)
    built = time.monotonic() - started
    settings = settings.model_copy(update={"model_name": f"bench-{size}"})
    result = train_model(spark, settings, FRAUD_SPEC, lakehouse=lakehouse,
                         options=TrainOptions.from_settings(settings), training_set=training_set)
    rows = spark.read.format("delta").option("versionAsOf", training_set.version).load(
        training_set.path).where(f"{EVENT_TIME_MS} >= {result.split_time_ms}").select(
        "event_id", "label").collect()
    bayes = roc_auc_score([r["label"] for r in rows],
                          [p_true[int(r["event_id"].rsplit("-", 1)[1])] for r in rows])
    return (f"training set {built:6.1f}s ({training_set.rows:,} labelled events) | "
            f"TorchDistributor training {result.durations_s['train']:6.1f}s "
            f"({result.training_set['train_rows']:,} rows, {TrainOptions.from_settings(settings).epochs} epochs) | "
            f"holdout ROC AUC {result.metrics['roc_auc']:.4f} vs Bayes-optimal {bayes:.4f} "
            f"({len(rows):,} events)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--no-train", action="store_true", help="batch views only")
    args = parser.parse_args()
    settings = load_settings()
    spark = spark_session(settings, app_name="lambdalake-bench")
    results = {}
    for size in [20_000, *args.sizes]:  # the first, small size warms the JVM up; not reported
        root = Path(tempfile.mkdtemp(prefix=f"bench-{size}-", dir=settings.state_path))
        lakehouse = Lakehouse(str(root))
        p_true = build_silver(lakehouse, size)
        bare = bare_group_by(spark, lakehouse)
        started = time.monotonic()
        run = compute_views(spark, lakehouse, FRAUD_SPEC)
        views = time.monotonic() - started
        warmup = size == 20_000 and not results and size not in args.sizes
        if not warmup:
            results[size] = (views, bare)
            print(f"{size:>12,} events: views {views:7.1f}s ({len(FRAUD_SPEC.views)} views, "
                  f"{run.row_counts['events']:,} valid events) | bare read+groupBy {bare:6.1f}s | "
                  f"ratio {views / bare:5.2f}", flush=True)
            if not args.no_train:
                print(f"{size:>12,} events: {train(spark, settings, lakehouse, run, p_true, size)}",
                      flush=True)
        shutil.rmtree(root, ignore_errors=True)
    if len(results) >= 2:
        small, large = min(results), max(results)
        print(f"t({large:,}) / t({small:,}) = {results[large][0] / results[small][0]:.2f} for views, "
              f"{results[large][1] / results[small][1]:.2f} for the bare baseline")


if __name__ == "__main__":
    main()
