"""Batch views: every feature view of the spec, recomputed from the master dataset.

A batch run fixes a boundary first: per Kafka partition of the events topic, the highest
offset validation has routed to silver or quarantine (`validated_boundary`), never bronze's
high-water mark, which may include records ingested after validation ran. Each view is then
computed from all silver events with offset <= boundary[partition], as monoid states per
(entity, bucket) with the aggregations' own Spark form (`Aggregation.spark_aggregate`), and
written over `gold/<view>` (a new Delta version).

Publishing is the last step (`lakehouse.tables.publish_run`): one row appended to
`batch/batch_runs` with the run id, its sequence in publish order, the boundary, the Delta
versions it read and wrote, row counts and durations; a run whose boundary lies below the
published one in any partition is refused. Readers take the newest run by sequence and read
each gold table at the version it names, so a run that dies half-way is never seen, and the
speed layer knows exactly which offsets the views cover.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from lakehouse.errors import BatchError
from lakehouse.spec import FeatureView, PlatformSpec
from lakehouse.tables import (
    BATCH_RUN_ID,
    BUCKET,
    BatchRun,
    Lakehouse,
    last_commit,
    publish_run,
    table_version,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["BUCKET", "BatchRun", "compute_views", "read_view", "view_states",
           "validated_boundary", "within_boundary"]


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


def validated_boundary(spark: SparkSession, lakehouse: Lakehouse, schema_name: str,
                       versions: dict[str, int | None]) -> dict[int, int]:
    """Per partition, the highest bronze offset validation has routed, as of the given silver
    and quarantine versions: every bronze record lands in exactly one of them, and slices are
    validated in bronze order, so each partition's validated offsets are a prefix of bronze.
    Views computed from silver at its version hold every valid event up to this boundary,
    whatever was ingested since (bronze's high-water mark may lie beyond it)."""
    from pyspark.sql import functions as F

    frames = [spark.read.format("delta").option("versionAsOf", version).load(path).select("partition", "offset")
              for path, version in ((lakehouse.silver(schema_name), versions.get("silver")),
                                    (lakehouse.quarantine(schema_name), versions.get("quarantine")))
              if version is not None]
    if not frames:
        return {}
    union = frames[0] if len(frames) == 1 else frames[0].unionByName(frames[1])
    rows = union.groupBy("partition").agg(F.max("offset").alias("offset")).collect()
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

    run_id = f"run-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    silver_path = lakehouse.silver(spec.events.name)
    # quarantine first: validation writes a slice's silver rows before its quarantine rows,
    # so the silver version read after it holds every valid record the quarantine implies
    quarantine_version = table_version(spark, lakehouse.quarantine(spec.events.name))
    silver_version = table_version(spark, silver_path)
    if silver_version is None:
        raise BatchError("no silver events yet: run `lambdalake batch ingest` and "
                         "`lambdalake batch validate` first")
    boundary = validated_boundary(spark, lakehouse, spec.events.name,
                                  {"silver": silver_version, "quarantine": quarantine_version})
    sources = {"silver_events": silver_version,
               "bronze_events": table_version(spark, lakehouse.bronze(spec.events.topic)) or 0}
    if quarantine_version is not None:
        sources["quarantine_events"] = quarantine_version
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
                   spec_fingerprint=spec.fingerprint(), finished_at=datetime.now(UTC))
    run = publish_run(lakehouse, run)
    echo(f"published {run_id} (#{run.sequence}): boundary {boundary}")
    return run


def read_view(spark: SparkSession, lakehouse: Lakehouse, run: BatchRun, view: str) -> DataFrame:
    """A gold view exactly as the given run published it."""
    return spark.read.format("delta").option("versionAsOf", run.view_versions[view]).load(
        lakehouse.gold(view))
