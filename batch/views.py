"""Batch views: every feature view of the spec, recomputed from the master dataset.

A batch run fixes a boundary first. It pins the silver and quarantine versions and reads,
per Kafka partition of the events topic, the highest offset validation has routed to one of
them (`validated_boundary`), never bronze's high-water mark, which may include records
ingested after validation ran: silver at the pinned version holds every valid event up to
it.

Without an online store that validated boundary is the run's boundary: its views are for
batch readers only (the speed layer adopts only runs that cut the store).

With the speed layer's online store (`lakehouse.online`), the boundary is the store's cut.
The run cuts every partition (`OnlineStore.cut`): the store closes the partition's open
epoch at the offset it has applied, and from then on the speed layer adds to the next epoch.
Gold holds exactly the silver events at or below the cut, so a reader's gold ⊕ the store's
epochs after the cut counts every event once, with nothing to subtract (`max` and `min`
cannot be subtracted: a boundary that differed from the cut would make the merge inexact).
A partition the speed group never stepped is cut at the validated boundary instead (its
floor), and the identities of the silver events the floor passes over join the store's seen
set in the same step, so a later copy of one is still recognised as a duplicate. Where the
speed layer applied further than validation reached, silver does not yet hold everything up
to the cut: the run catches up (`catch_up`: ingest and validate the events topic), pins the
new versions and checks again, a few rounds at most; the cut itself stays as it is. Each
view is then computed from the silver events with offset <= boundary[partition], as monoid
states per (entity, bucket) with the aggregations' own Spark form
(`Aggregation.spark_aggregate`), and written over `gold/<view>` (a new Delta version).

Publishing is the last step (`lakehouse.tables.publish_run`): one row appended to
`batch/batch_runs` with the run id, its sequence in publish order, the boundary, the store
epochs it cut, the Delta versions it read and wrote, row counts and durations; a run whose
boundary lies below the published one in any partition is refused. Readers take the newest
run by sequence and read each gold table at the version it names, so a run that dies
half-way is never seen, and the speed layer knows exactly which offsets the views cover.
Once a run is published, the store's epochs up to the cut of the run published just before
it are dropped: that run's readers read only the epochs after its cut.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from lakehouse.dedup import CLOCK, NO_CLOCK, forgettable_below
from lakehouse.errors import BatchError
from lakehouse.online.base import NOTHING, Cut, OnlineStore, event_identity
from lakehouse.spec import FeatureView, PlatformSpec, RecordSchema
from lakehouse.tables import (
    BATCH_RUN_ID,
    BUCKET,
    BatchRun,
    Lakehouse,
    last_commit,
    publish_run,
    published_runs,
    table_version,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["BUCKET", "CATCH_UP_ROUNDS", "BatchRun", "compute_views", "read_view",
           "view_states", "validated_boundary", "within_boundary"]

CATCH_UP_ROUNDS = 3  # catch-ups a run tries before giving up on silver reaching the store's cut


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


@dataclass(frozen=True)
class _Pinned:
    """The silver and quarantine versions a run reads, and what validation routed by them."""

    silver: int
    quarantine: int | None
    validated: dict[int, int]  # validated_boundary at these versions


def _pin(spark: SparkSession, lakehouse: Lakehouse, spec: PlatformSpec) -> _Pinned:
    # quarantine first: validation writes a slice's silver rows before its quarantine rows,
    # so the silver version read after it holds every valid record the quarantine implies
    quarantine_version = table_version(spark, lakehouse.quarantine(spec.events.name))
    silver_version = table_version(spark, lakehouse.silver(spec.events.name))
    if silver_version is None:
        raise BatchError("no silver events yet: run `lambdalake batch ingest` and "
                         "`lambdalake batch validate` first")
    validated = validated_boundary(spark, lakehouse, spec.events.name,
                                   {"silver": silver_version, "quarantine": quarantine_version})
    return _Pinned(silver_version, quarantine_version, validated)


def _remember(spark: SparkSession, lakehouse: Lakehouse, schema: RecordSchema, silver_version: int,
              partition: int, floor: int) -> Callable[[int], list[tuple[str, int]]]:
    """`remember` of a cut over a floor: (identity, clock) of the partition's silver events
    (at the pinned version) with offsets above the store's previous applied offset through
    `floor`, those within the dedup horizon of the latest clock among them (`lakehouse.dedup`:
    older ones can have no duplicates any more)."""
    def identities(previous: int) -> list[tuple[str, int]]:
        from pyspark.sql import functions as F

        rows = (spark.read.format("delta").option("versionAsOf", silver_version)
                .load(lakehouse.silver(schema.name))
                .where((F.col("partition") == partition) & (F.col("offset") > previous)
                       & (F.col("offset") <= floor)))
        clocked = [(event_identity(schema, row.asDict()), int(row["clock"]) // 1000) for row in rows.select(
            schema.key_field, schema.id_field, F.unix_micros(F.col(CLOCK)).alias("clock")).collect()]
        below = forgettable_below(max((c for _, c in clocked), default=NO_CLOCK), schema.dedup_horizon_ms)
        return clocked if below is None else [(i, c) for i, c in clocked if c >= below]

    return identities


def _cut_store(spark: SparkSession, lakehouse: Lakehouse, spec: PlatformSpec, store: OnlineStore,
               pinned: _Pinned, partitions: int) -> dict[int, Cut]:
    """Cut every partition (those of the topic, and any validation saw) at the store's applied
    offset, or at the validated boundary for a partition the speed group never stepped."""
    cuts: dict[int, Cut] = {}
    for p in sorted(set(range(partitions)) | set(pinned.validated)):
        floor = pinned.validated.get(p, NOTHING)
        cuts[p] = store.cut(p, floor=floor, remember=_remember(spark, lakehouse, spec.events, pinned.silver,
                                                               p, floor))
    return cuts


def _behind(validated: Mapping[int, int], boundary: Mapping[int, int]) -> dict[int, tuple[int, int]]:
    """Partitions whose validated offsets stop below the boundary: (validated, boundary)."""
    return {p: (validated.get(p, NOTHING), o) for p, o in sorted(boundary.items())
            if validated.get(p, NOTHING) < o}


def _catch_up_to_cut(spark: SparkSession, lakehouse: Lakehouse, spec: PlatformSpec, pinned: _Pinned,
                     boundary: Mapping[int, int], catch_up: Callable[[], None] | None,
                     echo: Callable[[str], None]) -> _Pinned:
    """Pinned versions at which silver holds every event up to the boundary (the store's cut),
    catching up (ingest + validate) as often as CATCH_UP_ROUNDS allows."""
    rounds = 0
    while behind := _behind(pinned.validated, boundary):
        if catch_up is None or rounds == CATCH_UP_ROUNDS:
            tried = (f"after {rounds} catch-up round(s) (ingest + validate of {spec.events.topic})"
                     if catch_up is not None else "and this run was given no way to catch up")
            raise BatchError(
                "the online store's cut lies beyond what validation has routed to silver "
                f"{tried}, in partition(s) " + ", ".join(
                    f"{p} (validated through offset {mine}, store cut at {cut})"
                    for p, (mine, cut) in behind.items())
                + ": check `lambdalake batch validate` (e.g. a slice refused by the failure-rate "
                "gate, `lambdalake batch accept`) and whether Kafka still holds those offsets")
        rounds += 1
        echo("the speed layer applied beyond validation in partition(s) "
             + ", ".join(f"{p} ({mine} < {cut})" for p, (mine, cut) in behind.items())
             + f": catching up (round {rounds} of {CATCH_UP_ROUNDS})")
        catch_up()
        pinned = _pin(spark, lakehouse, spec)
    return pinned


def _drop_superseded_epochs(lakehouse: Lakehouse, store: OnlineStore, run: BatchRun,
                            echo: Callable[[str], None]) -> None:
    """Drop the store epochs up to the cut of the run published just before `run`: its
    readers read only the epochs after that cut, and `run`'s only those after its own."""
    previous = next((r for r in published_runs(lakehouse) if r.sequence == run.sequence - 1), None)
    if previous is None or previous.spec_fingerprint != run.spec_fingerprint or not previous.cut_epochs:
        return
    dropped = 0
    for p, epoch in sorted(previous.cut_epochs.items()):
        if p in run.cut_epochs:  # never past this run's own cut (a run that overlapped it)
            dropped += store.drop_epochs(p, min(epoch, run.cut_epochs[p]))
    if dropped:
        echo(f"dropped {dropped} online-store epoch(s) up to the cuts of {previous.run_id}")


def compute_views(
    spark: SparkSession,
    lakehouse: Lakehouse,
    spec: PlatformSpec,
    *,
    store: OnlineStore | None = None,
    partitions: int = 0,
    catch_up: Callable[[], None] | None = None,
    echo: Callable[[str], None] = lambda line: None,
) -> BatchRun:
    """Recompute every view up to the boundary and publish the run.

    Without `store`, the boundary is the validated one and the run cuts nothing: its views
    are for batch readers only (the speed layer adopts only runs that cut the store). With
    it, every partition (`range(partitions)`, the events topic's, and any validation saw) is
    cut and the cuts are the boundary; `catch_up` (ingest + validate the events topic) runs
    while validation lies below a cut, CATCH_UP_ROUNDS times at most, then BatchError."""
    from pyspark.sql import functions as F

    run_id = f"run-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    silver_path = lakehouse.silver(spec.events.name)
    pinned = _pin(spark, lakehouse, spec)
    cut_epochs: dict[int, int] = {}
    if store is None:
        boundary = pinned.validated
    else:
        cuts = _cut_store(spark, lakehouse, spec, store, pinned, partitions)
        # a partition cut at -1 (nothing in it yet) is left out, as validated_boundary does
        boundary = {p: c.offset for p, c in cuts.items() if c.offset != NOTHING}
        cut_epochs = {p: c.epoch for p, c in cuts.items()}
        echo("cut the online store at " + ", ".join(
            f"{p}: offset {c.offset} (epoch {c.epoch})" for p, c in cuts.items()))
        pinned = _catch_up_to_cut(spark, lakehouse, spec, pinned, boundary, catch_up, echo)
    silver_version, quarantine_version = pinned.silver, pinned.quarantine
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
    run = BatchRun(run_id=run_id, boundary=boundary, cut_epochs=cut_epochs, view_versions=versions,
                   source_versions=sources, row_counts=counts, durations_s=durations,
                   spec_fingerprint=spec.fingerprint(), finished_at=datetime.now(UTC))
    run = publish_run(lakehouse, run)
    echo(f"published {run_id} (#{run.sequence}): boundary {boundary}"
         + (f", online-store epochs cut {cut_epochs}" if cut_epochs else " (no online store cut)"))
    if store is not None:
        _drop_superseded_epochs(lakehouse, store, run, echo)
    return run


def read_view(spark: SparkSession, lakehouse: Lakehouse, run: BatchRun, view: str) -> DataFrame:
    """A gold view exactly as the given run published it."""
    return spark.read.format("delta").option("versionAsOf", run.view_versions[view]).load(
        lakehouse.gold(view))
