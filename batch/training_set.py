"""Point-in-time-correct training sets, from the same feature definitions as every layer.

For each event of a published batch run (silver events within the run's boundary, at the
silver version the run read), the features are the model inputs as of just before it,
computed inside Spark per entity (`groupBy(entity).applyInArrow`) with the fold every
layer uses (`lakehouse.features`), and the spec's `ModelInput`s derive the vector:

- an event the speed layer scored is recomputed as of the coverage vector its row records
  (`speed/scored_events.coverage`): the entity's events of every other partition at or
  below the vector's offset, and of its own partition before it. That is exactly what the
  speed layer read, so the features it served and the ones trained on are equal, for every
  entity, with any number of members (train/serve skew 0);
- an event never scored (history the batch covered before the speed layer ran) uses the
  canonical order `FeatureView` defines: the events of its entity that arrived before it,
  by Kafka offset for the entity that keys the messages, by (event time, partition,
  offset) for any other (`lakehouse.features.replay`).

Labels join by event id, and only labels whose `label_time` is at or before the cut-off
count (a label that arrived later was not known when training is meant to have happened).

The result is written over the Delta table `training/<spec>`; its version is lineage for
the model trained from it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from batch.views import within_boundary
from lakehouse.errors import BatchError
from lakehouse.features import (
    OFFSET,
    PARTITION,
    ViewStates,
    arrival_order,
    replay,
    state_column,
    states_from_row,
    views_by_entity,
)
from lakehouse.spec import FeatureView, PlatformSpec
from lakehouse.tables import (
    BATCH_RUN_ID,
    EVENT_TIME_MS,
    BatchRun,
    Lakehouse,
    last_commit,
    table_version,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

EVENT_ID = "event_id"
COVERAGE = "coverage"  # speed/scored_events: partition → the highest offset the features include
LABEL = "label"
LABEL_TIME_MS = "label_time_ms"


@dataclass(frozen=True)
class TrainingSet:
    """A training set as written: where, which version, and what it was built from."""

    path: str
    version: int
    rows: int
    positives: int
    batch_run_id: str
    label_cutoff_ms: int | None
    labels_version: int
    feature_names: tuple[str, ...]


def _state_schema(views: list[FeatureView]) -> list[tuple[str, str]]:
    return [(state_column(v.name, name), aggregation.spark_type)
            for v in views for name, aggregation in v.aggregations.items()]


def as_of_vectors(views: list[FeatureView], events: list[dict[str, Any]], time_field: str,
                  ) -> dict[int, dict[str, dict[str, Any]]]:
    """One entity's states for each event that carries a coverage vector (`COVERAGE`, a
    partition → offset mapping): index in `events` → view → states over the entity's
    events of every other partition at or below the vector's offset and of its own
    partition below its own offset. One sweep per partition, the queries in offset order."""
    entity_field = views[0].entity
    by_partition: dict[int, list[dict[str, Any]]] = {}
    for event in events:
        by_partition.setdefault(event[PARTITION], []).append(event)
    asked = [i for i, e in enumerate(events) if e.get(COVERAGE) is not None]
    out: dict[int, dict[str, dict[str, Any]]] = {
        i: {v.name: {n: a.zero for n, a in v.aggregations.items()} for v in views} for i in asked}
    for partition, arrived in by_partition.items():
        arrived.sort(key=lambda e: e[OFFSET])
        limits = []
        for i in asked:
            event = events[i]
            limit = event[OFFSET] - 1 if event[PARTITION] == partition else \
                dict(event[COVERAGE]).get(partition, -1)
            limits.append((limit, i))
        limits.sort()
        tables = [ViewStates(view) for view in views]
        added = 0
        for limit, i in limits:
            while added < len(arrived) and arrived[added][OFFSET] <= limit:
                for table in tables:
                    table.add(arrived[added], time_field)
                added += 1
            if not added:
                continue
            event = events[i]
            for table in tables:
                read = table.read(event[entity_field], event[time_field])
                states = out[i][table.view.name]
                for name, aggregation in table.view.aggregations.items():
                    states[name] = aggregation.plus(states[name], read[name])
    return out


def _replay_entity(table: pa.Table, *, views: list[FeatureView], order: tuple[str, ...],
                   id_field: str, time_field: str, columns: list[tuple[str, str]]) -> pa.Table:
    """One entity's events (any order) → the point-in-time states of each event: as of its
    coverage vector where it has one, else in the view's arrival order."""
    events = table.sort_by([(name, "ascending") for name in order]).to_pylist()
    vectored = as_of_vectors(views, events, time_field) if COVERAGE in table.column_names else {}
    out: dict[str, list[Any]] = {name: [] for name, _ in columns}
    for i, states in enumerate(replay(views, events, time_field)):
        chosen = vectored.get(i, states)
        for view in views:
            for name, value in chosen[view.name].items():
                out[state_column(view.name, name)].append(value)
    arrays = [pa.array([e[id_field] for e in events], pa.string())]
    for name, sql_type in columns:
        arrow_type = pa.decimal128(38, 0) if sql_type.startswith("decimal") else pa.int64()
        arrays.append(pa.array(out[name], arrow_type))
    return pa.Table.from_arrays(arrays, names=[id_field, *[n for n, _ in columns]])


def _derive_features(batches: Iterator[pa.RecordBatch], *, spec: PlatformSpec,
                     decimal_columns: frozenset[str]) -> Iterator[pa.RecordBatch]:
    """Flat rows of event fields and states → the model input vector per event."""
    time_field = spec.events.time_field
    for batch in batches:
        rows = batch.to_pylist()
        vectors = []
        for row in rows:
            for name in decimal_columns:  # exact integers, as in every other layer
                if row[name] is not None:
                    row[name] = int(row[name])
            event = {**row, time_field: row[EVENT_TIME_MS]}
            vectors.append(spec.features(states_from_row(spec, row), event))
        arrays = [batch.column(EVENT_ID), batch.column(EVENT_TIME_MS),
                  batch.column(PARTITION), batch.column(OFFSET)]
        for i, _ in enumerate(spec.feature_names):
            arrays.append(pa.array([v[i] for v in vectors], pa.float64()))
        yield pa.RecordBatch.from_arrays(
            arrays, names=[EVENT_ID, EVENT_TIME_MS, PARTITION, OFFSET, *spec.feature_names])


def _unannotated(function: Callable[[pa.Table], pa.Table]):  # type: ignore[no-untyped-def]
    """`applyInArrow` infers its mode from type hints and chokes on a partial's keyword
    parameters; a plain wrapper without hints gets the table-in, table-out mode."""
    def call(table):  # type: ignore[no-untyped-def]
        return function(table)
    return call


def point_in_time_features(events: DataFrame, spec: PlatformSpec, *,
                           vectors: DataFrame | None = None) -> DataFrame:
    """Typed silver events → (event id, event time ms, partition, offset, one column per
    model input), each vector computed from the events that preceded the event: as of the
    coverage vector `vectors` gives it ((partition, offset, coverage) rows: the scored
    events), else in arrival order (see the module docstring)."""
    from pyspark.sql import functions as F

    id_field, time_field = spec.events.id_field, spec.events.time_field
    typed = events.select(
        *[F.col(name) for name in spec.events.field_names if name != time_field],
        F.unix_millis(F.col(time_field)).alias(time_field),
        F.col(PARTITION), F.col(OFFSET),
    )
    if vectors is not None:
        typed = typed.join(vectors.select(PARTITION, OFFSET, COVERAGE), on=[PARTITION, OFFSET], how="left")
    joined = typed.drop(COVERAGE).withColumnRenamed(time_field, EVENT_TIME_MS)
    decimal_columns: set[str] = set()
    for entity, views in views_by_entity(spec).items():
        columns = _state_schema(views)
        decimal_columns.update(name for name, sql_type in columns if sql_type.startswith("decimal"))
        schema = ", ".join([f"{id_field} string", *[f"{n} {t}" for n, t in columns]])
        replayer = _unannotated(functools.partial(
            _replay_entity, views=views, order=arrival_order(spec, views[0]),
            id_field=id_field, time_field=time_field, columns=columns))
        states = typed.groupBy(entity).applyInArrow(replayer, schema)
        joined = joined.join(states, on=id_field, how="inner")
    output = ", ".join([f"{EVENT_ID} string", f"{EVENT_TIME_MS} bigint", f"{PARTITION} int",
                        f"{OFFSET} bigint", *[f"{n} double" for n in spec.feature_names]])
    derive = functools.partial(_derive_features, spec=spec, decimal_columns=frozenset(decimal_columns))
    return joined.withColumnRenamed(id_field, EVENT_ID).mapInArrow(derive, output)


def labels_until(labels: DataFrame, spec: PlatformSpec, cutoff_ms: int | None) -> DataFrame:
    """(event id, label 0/1, label time ms) of the labels known at the cut-off."""
    from pyspark.sql import functions as F

    label_ms = F.unix_millis(F.col(spec.labels.time_field))
    known = labels if cutoff_ms is None else labels.where(label_ms <= F.lit(cutoff_ms))
    return known.select(
        F.col(spec.labels.id_field).alias(EVENT_ID),
        F.col(spec.label_field).cast("int").alias(LABEL),
        label_ms.alias(LABEL_TIME_MS),
    )


def build_training_set(
    spark: SparkSession,
    lakehouse: Lakehouse,
    spec: PlatformSpec,
    run: BatchRun,
    *,
    label_cutoff_ms: int | None = None,
    group: str | None = None,
    echo: Callable[[str], None] = lambda line: None,
) -> TrainingSet:
    """Write the training set of a published batch run over `training/<spec>`; the events
    speed group `group` scored are recomputed as of the coverage vectors they were scored
    with."""
    from pyspark.sql import functions as F

    labels_path = lakehouse.silver(spec.labels.name)
    labels_version = table_version(spark, labels_path)
    if labels_version is None:
        raise BatchError(f"no silver labels yet: ingest and validate topic "
                         f"{spec.labels.topic!r} first (`lambdalake batch run`)")
    events = within_boundary(
        spark.read.format("delta").option("versionAsOf", run.source_versions["silver_events"])
        .load(lakehouse.silver(spec.events.name)),
        run.boundary,
    )
    labels = spark.read.format("delta").option("versionAsOf", labels_version).load(labels_path)
    vectors = None
    if group is not None and table_version(spark, lakehouse.scored_events) is not None:
        vectors = (spark.read.format("delta").load(lakehouse.scored_events)
                   .where(F.col("consumer_group") == group).select(PARTITION, OFFSET, COVERAGE))
    echo(f"training set: replaying each entity's history (batch run {run.run_id})")
    rows = (
        point_in_time_features(events, spec, vectors=vectors)
        .join(labels_until(labels, spec, label_cutoff_ms), on=EVENT_ID, how="inner")
        .withColumn(BATCH_RUN_ID, F.lit(run.run_id))
    )
    path = lakehouse.training_set(spec.name)
    rows.write.format("delta").mode("overwrite").option("overwriteSchema", "true").save(path)
    version, count = last_commit(spark, path)
    positives = spark.read.format("delta").option("versionAsOf", version).load(path).where(
        F.col(LABEL) == 1).count()
    if count == 0:
        raise BatchError("the training set is empty: no labelled event within the batch "
                         "run's boundary" + (" before the label cut-off" if label_cutoff_ms else ""))
    echo(f"training set: {count} labelled events ({positives} positive), Delta v{version}")
    return TrainingSet(path=path, version=version, rows=count, positives=positives,
                       batch_run_id=run.run_id, label_cutoff_ms=label_cutoff_ms,
                       labels_version=labels_version, feature_names=spec.feature_names)
