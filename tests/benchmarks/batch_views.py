"""Batch views benchmark: `compute_views` against a bare Spark read + groupBy of the same
silver table, run side by side, at two sizes; prints times, the ratio and t(large)/t(small).

Silver is built straight from the generator (parsed with the spec, written with deltalake),
so the figures measure the views, not Kafka. Run (it takes minutes at 10M):

    .venv/bin/python tests/benchmarks/batch_views.py --sizes 1000000 10000000
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
from deltalake import write_deltalake
from kafka.partitioner.default import murmur2

from batch.validate import LINEAGE, parsed_arrow_schema
from batch.views import compute_views
from lakehouse.config import load_settings
from lakehouse.fraud import FRAUD_SPEC, TRANSACTIONS
from lakehouse.generator import GeneratorOptions, generate
from lakehouse.spark import spark_session
from lakehouse.tables import Lakehouse

CHUNK = 200_000


def build_silver(lakehouse: Lakehouse, events: int, partitions: int = 4) -> None:
    """Valid generated transactions as a silver table, and their offsets as a bronze table."""
    schema = parsed_arrow_schema(TRANSACTIONS)
    silver_fields = [schema.field(n) for n in (*TRANSACTIONS.field_names, *LINEAGE)]
    offsets = [0] * partitions
    rows: list[dict] = []  # type: ignore[type-arg]
    started = time.monotonic()
    options = GeneratorOptions(events=events, seed=7, malformed_fraction=0, duplicate_fraction=0)
    for message in generate(options):
        if message.topic != TRANSACTIONS.topic:
            continue
        record = TRANSACTIONS.parse(message.value)
        # the Java client's partition for the key, as Kafka would have assigned it
        partition = (murmur2(message.key) & 0x7FFFFFFF) % partitions
        record.update(topic="events", partition=partition, offset=offsets[partition],
                      kafka_timestamp=record["event_time"] * 1000, ingest_time=record["event_time"] * 1000)
        record["event_time"] *= 1000
        offsets[partition] += 1
        rows.append(record)
        if len(rows) == CHUNK:
            _flush(lakehouse, rows, silver_fields)
    if rows:
        _flush(lakehouse, rows, silver_fields)
    bronze = pa.table({"partition": pa.array(range(partitions), pa.int32()),
                       "offset": pa.array([o - 1 for o in offsets], pa.int64())})
    write_deltalake(lakehouse.bronze("events"), bronze, mode="overwrite")
    print(f"silver: {sum(offsets):,} events written in {time.monotonic() - started:.1f}s", flush=True)


def _flush(lakehouse: Lakehouse, rows: list[dict], fields: list[pa.Field]) -> None:  # type: ignore[type-arg]
    table = pa.Table.from_pylist(rows, schema=pa.schema(fields))
    write_deltalake(lakehouse.silver(TRANSACTIONS.name), table, mode="append")
    rows.clear()


def bare_group_by(spark, lakehouse: Lakehouse) -> float:  # type: ignore[no-untyped-def]
    """The baseline: read silver and count/sum per user, nothing else."""
    started = time.monotonic()
    frame = spark.read.format("delta").load(lakehouse.silver(TRANSACTIONS.name))
    frame.groupBy("user_id").agg({"amount": "sum", "*": "count"}).write.format("noop").mode(
        "overwrite").save()
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    args = parser.parse_args()
    settings = load_settings()
    spark = spark_session(settings, app_name="lambdalake-bench")
    results = {}
    for size in [20_000, *args.sizes]:  # the first, small size warms the JVM up; not reported
        root = Path(tempfile.mkdtemp(prefix=f"bench-{size}-", dir=settings.state_path))
        lakehouse = Lakehouse(str(root))
        build_silver(lakehouse, size)
        bare = bare_group_by(spark, lakehouse)
        started = time.monotonic()
        run = compute_views(spark, lakehouse, FRAUD_SPEC)
        views = time.monotonic() - started
        shutil.rmtree(root, ignore_errors=True)
        if size == 20_000 and results == {} and size not in args.sizes:
            results[-1] = (views, bare)
            continue
        results[size] = (views, bare)
        print(f"{size:>12,} events: views {views:7.1f}s ({len(FRAUD_SPEC.views)} views, "
              f"{run.row_counts['events']:,} valid events) | bare read+groupBy {bare:6.1f}s | "
              f"ratio {views / bare:5.2f}", flush=True)
    results.pop(-1, None)
    if len(results) >= 2:
        small, large = min(results), max(results)
        print(f"t({large:,}) / t({small:,}) = {results[large][0] / results[small][0]:.2f} for views, "
              f"{results[large][1] / results[small][1]:.2f} for the bare baseline")


if __name__ == "__main__":
    main()
