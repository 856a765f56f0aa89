"""Batch views: every feature view of the spec, recomputed from the master dataset.

A batch run fixes a boundary first: per Kafka partition of the events topic, the highest
offset bronze holds (silver is complete up to it once validation has run). Each view is then
computed from all silver events with offset <= boundary[partition], as monoid states per
(entity, bucket) with the aggregations' own Spark form (`Aggregation.spark_aggregate`), and
written over `gold/<view>` (a new Delta version).

Publishing is the last step: one row appended to `batch/batch_runs` with the run id, the
boundary, the Delta versions it read and wrote, row counts and durations. Readers take the
latest published row and read each gold table at the version it names, so a run that dies
half-way is never seen, and the speed layer knows exactly which offsets the views cover.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from lakehouse.errors import PlatformError
from lakehouse.spec import FeatureView, PlatformSpec
from lakehouse.tables import Lakehouse, last_commit, table_version

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

BUCKET = "bucket_start_ms"
BATCH_RUN_ID = "batch_run_id"


@dataclass(frozen=True)
class BatchRun:
    """A published batch run: what the views include and where they are."""

    run_id: str
    boundary: dict[int, int]  # partition → highest offset included
    view_versions: dict[str, int]
    source_versions: dict[str, int]
    row_counts: dict[str, int]
    durations_s: dict[str, float]
    spec_fingerprint: str
    finished_at: datetime


def view_states(events: DataFrame, view: FeatureView) -> DataFrame:
    """Monoid states of one view per (entity, bucket start in epoch ms) from typed events."""
    from pyspark.sql import functions as F

    event_ms = F.unix_millis(F.col("event_time"))
    bucket = (event_ms - F.pmod(event_ms, F.lit(view.bucket_ms))) if view.bucket_ms else F.lit(0)
    return (
        events.withColumn(BUCKET, bucket.cast("bigint"))
        .groupBy(view.entity, BUCKET)
        .agg(*[aggregation.spark_aggregate().alias(name)
               for name, aggregation in view.aggregations.items()])
    )


def current_boundary(spark: SparkSession, lakehouse: Lakehouse, topic: str) -> dict[int, int]:
    """Highest bronze offset per partition of a topic ({} before anything was ingested)."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    path = lakehouse.bronze(topic)
    if not DeltaTable.isDeltaTable(spark, path):
        return {}
    rows = spark.read.format("delta").load(path).groupBy("partition").agg(
        F.max("offset").alias("offset")).collect()
    return {int(r["partition"]): int(r["offset"]) for r in rows}


def within_boundary(events: DataFrame, boundary: dict[int, int]) -> DataFrame:
    """Events whose (partition, offset) the boundary includes."""
    from pyspark.sql import functions as F

    if not boundary:
        return events.limit(0)
    limit = F.create_map(*[F.lit(x) for p, o in sorted(boundary.items()) for x in (p, o)])
    return events.where(F.col("offset") <= F.coalesce(limit[F.col("partition")], F.lit(-1)))


def compute_views(
    spark: SparkSession,
    lakehouse: Lakehouse,
    spec: PlatformSpec,
    *,
    echo: Callable[[str], None] = lambda line: None,
) -> BatchRun:
    """Recompute every view up to the current boundary and publish the run."""
    from pyspark.sql import functions as F

    run_id = f"run-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    silver_path = lakehouse.silver(spec.events.name)
    boundary = current_boundary(spark, lakehouse, spec.events.topic)
    silver_version = table_version(spark, silver_path)
    if silver_version is None:
        raise PlatformError("no silver events yet: run `lambdalake batch ingest` and "
                            "`lambdalake batch validate` first")
    sources = {"silver_events": silver_version,
               "bronze_events": table_version(spark, lakehouse.bronze(spec.events.topic)) or 0}
    events = within_boundary(
        spark.read.format("delta").option("versionAsOf", silver_version).load(silver_path), boundary
    ).cache()
    counts = {"events": events.count()}
    durations: dict[str, float] = {}
    versions: dict[str, int] = {}
    for view in spec.views:
        started = time.monotonic()
        states = view_states(events, view).withColumn(BATCH_RUN_ID, F.lit(run_id))
        (states.write.format("delta").mode("overwrite").option("overwriteSchema", "true")
         .save(lakehouse.gold(view.name)))
        versions[view.name], counts[view.name] = last_commit(spark, lakehouse.gold(view.name))
        durations[view.name] = round(time.monotonic() - started, 3)
        echo(f"view {view.name}: {counts[view.name]} (entity, bucket) states "
             f"in {durations[view.name]:.1f}s (gold v{versions[view.name]})")
    events.unpersist()
    run = BatchRun(run_id=run_id, boundary=boundary, view_versions=versions,
                   source_versions=sources, row_counts=counts, durations_s=durations,
                   spec_fingerprint=spec.fingerprint(), finished_at=datetime.now(timezone.utc))
    publish(spark, lakehouse, run)
    echo(f"published {run_id}: boundary {boundary}")
    return run


def publish(spark: SparkSession, lakehouse: Lakehouse, run: BatchRun) -> None:
    """Append the run to batch_runs: from now on readers see its views."""
    from pyspark.sql.types import (
        DoubleType,
        IntegerType,
        LongType,
        MapType,
        StringType,
        StructField,
        StructType,
        TimestampType,
    )

    schema = StructType([
        StructField("run_id", StringType(), False),
        StructField("boundary", MapType(IntegerType(), LongType()), False),
        StructField("view_versions", MapType(StringType(), LongType()), False),
        StructField("source_versions", MapType(StringType(), LongType()), False),
        StructField("row_counts", MapType(StringType(), LongType()), False),
        StructField("durations_s", MapType(StringType(), DoubleType()), False),
        StructField("spec_fingerprint", StringType(), False),
        StructField("finished_at", TimestampType(), False),
    ])
    row = (run.run_id, run.boundary, run.view_versions, run.source_versions, run.row_counts,
           run.durations_s, run.spec_fingerprint, run.finished_at)
    spark.createDataFrame([row], schema).write.format("delta").mode("append").save(lakehouse.batch_runs)


def latest_run(spark: SparkSession, lakehouse: Lakehouse) -> BatchRun | None:
    """The most recently published batch run, or None before the first."""
    from delta.tables import DeltaTable

    if not DeltaTable.isDeltaTable(spark, lakehouse.batch_runs):
        return None
    rows = spark.read.format("delta").load(lakehouse.batch_runs).orderBy(
        "finished_at", ascending=False).limit(1).collect()
    if not rows:
        return None
    r = rows[0]
    return BatchRun(run_id=r["run_id"], boundary=dict(r["boundary"]),
                    view_versions=dict(r["view_versions"]), source_versions=dict(r["source_versions"]),
                    row_counts=dict(r["row_counts"]), durations_s=dict(r["durations_s"]),
                    spec_fingerprint=r["spec_fingerprint"],
                    # Spark hands back naive datetimes in the session time zone, which is UTC
                    finished_at=r["finished_at"].replace(tzinfo=timezone.utc))


def read_view(spark: SparkSession, lakehouse: Lakehouse, run: BatchRun, view: str) -> DataFrame:
    """A gold view exactly as the given run published it."""
    return spark.read.format("delta").option("versionAsOf", run.view_versions[view]).load(
        lakehouse.gold(view))
