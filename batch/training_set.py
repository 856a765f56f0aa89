"""Point-in-time-correct training sets, from the same feature definitions as every layer.

For each event of a published batch run (silver events within the run's boundary, at the
silver version the run read), the features are the model inputs as of just before it:
each entity's history is replayed in arrival order inside Spark (`groupBy(entity)
.applyInArrow`) with `lakehouse.features.replay`, the fold the speed layer runs on live
events, and the spec's `ModelInput`s derive the vector. Labels join by event id, and only
labels whose `label_time` is at or before the cut-off count (a label that arrived later was
not known when training is meant to have happened).

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


def _replay_entity(table: pa.Table, *, views: list[FeatureView], order: tuple[str, ...],
                   id_field: str, time_field: str, columns: list[tuple[str, str]]) -> pa.Table:
    """One entity's events (any order) → the point-in-time states of each event."""
    events = table.sort_by([(name, "ascending") for name in order]).to_pylist()
    out: dict[str, list[Any]] = {name: [] for name, _ in columns}
    for states in replay(views, events, time_field):
        for view in views:
            for name, value in states[view.name].items():
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


def point_in_time_features(events: DataFrame, spec: PlatformSpec) -> DataFrame:
    """Typed silver events → (event id, event time ms, partition, offset, one column per
    model input), each vector computed from the events that preceded the event."""
    from pyspark.sql import functions as F

    id_field, time_field = spec.events.id_field, spec.events.time_field
    typed = events.select(
        *[F.col(name) for name in spec.events.field_names if name != time_field],
        F.unix_millis(F.col(time_field)).alias(time_field),
        F.col(PARTITION), F.col(OFFSET),
    )
    joined = typed.withColumnRenamed(time_field, EVENT_TIME_MS)
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
    echo: Callable[[str], None] = lambda line: None,
) -> TrainingSet:
    """Write the training set of a published batch run over `training/<spec>`."""
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
    echo(f"training set: replaying each entity's history (batch run {run.run_id})")
    rows = (
        point_in_time_features(events, spec)
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
