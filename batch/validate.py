"""Validate: each new bronze slice into silver (typed, deduplicated) and quarantine.

Every bronze record is checked with the spec's single validation routine
(`RecordSchema.inspect`, which `parse` in the speed layer shares), run inside Spark through
`mapInArrow`; the Great Expectations suite derived from the same spec runs on the slice and
keeps the Data Docs. A record lands in exactly one place:
- silver/<schema>: the typed record (money in integer cents, timestamps as UTC timestamps)
  with its Kafka partition and offset, once per id: the first arrival (lowest offset) wins,
  and a record is a duplicate only of another record (partition, offset), never of itself;
- quarantine/<schema>: the raw record (key, value bytes, topic, partition, offset) with the
  list of reasons it was rejected (`<rule>:<field>`, or `duplicate:<id field>` for a later
  arrival of an id silver already has).
So bronze row count = silver + quarantine, always: nothing is dropped silently.

New slices are found by reading bronze as a Delta stream with `trigger(availableNow=True)`;
each micro-batch writes silver and quarantine with Delta app transactions keyed by the
micro-batch id, so a killed run, replayed, writes nothing twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from batch.expectations import (
    JSON_OBJECT,
    UNIQUE,
    UNKNOWN_FIELDS,
    DataQualityReport,
    expectation_for,
)
from lakehouse.errors import DataQualityError
from lakehouse.spec import FieldSpec, RecordSchema
from lakehouse.tables import Lakehouse, appended_since, table_version

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

REASONS = "reasons"
FAILED_EXPECTATIONS = "failed_expectations"
LINEAGE = ("topic", "partition", "offset", "kafka_timestamp", "ingest_time")

_ARROW_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "long": pa.int64(),
    "double": pa.float64(),
    "money": pa.int64(),
    "boolean": pa.bool_(),
    "timestamp": pa.timestamp("us", tz="UTC"),  # Spark's precision; values are whole ms
}


def _arrow_type(field: FieldSpec) -> pa.DataType:
    return _ARROW_TYPES[field.type]


def parsed_arrow_schema(schema: RecordSchema) -> pa.Schema:
    """Inspected fields, the data-quality columns, the reasons, then the raw record."""
    return pa.schema(
        [pa.field(f.name, _arrow_type(f)) for f in schema.fields]
        + [
            pa.field(JSON_OBJECT, pa.bool_()),
            pa.field(UNKNOWN_FIELDS, pa.int32()),
            pa.field(REASONS, pa.list_(pa.string())),
            pa.field(FAILED_EXPECTATIONS, pa.list_(pa.string())),
            pa.field("key", pa.binary()),
            pa.field("value", pa.binary()),
            pa.field("topic", pa.string()),
            pa.field("partition", pa.int32()),
            pa.field("offset", pa.int64()),
            pa.field("kafka_timestamp", pa.timestamp("us", tz="UTC")),
            pa.field("ingest_time", pa.timestamp("us", tz="UTC")),
        ]
    )


def inspect_batches(schema: RecordSchema) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """A mapInArrow function: bronze record batches → inspected record batches.

    Field columns hold each value as far as it could be read (see `RecordSchema.inspect`);
    a row is valid when its `reasons` are empty."""
    arrow_schema = parsed_arrow_schema(schema)
    names = schema.field_names
    timestamps = {f.name for f in schema.fields if f.type == "timestamp"}

    def inspect(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            columns: dict[str, list[Any]] = {name: [] for name in names}
            objects, unknown, reasons, failed = [], [], [], []
            for raw in batch.column("value").to_pylist():
                found = schema.inspect(raw if raw is not None else b"")
                for name in names:
                    value = found.values.get(name)
                    if name in timestamps and value is not None:
                        value *= 1000  # epoch ms → µs
                    columns[name].append(value)
                objects.append(found.is_object)
                unknown.append(found.unknown_fields)
                reasons.append(found.reasons)
                failed.append(sorted({expectation_for(r) for r in found.reasons}))
            arrays = [pa.array(columns[f.name], type=_arrow_type(f)) for f in schema.fields]
            arrays += [
                pa.array(objects, type=pa.bool_()),
                pa.array(unknown, type=pa.int32()),
                pa.array(reasons, type=pa.list_(pa.string())),
                pa.array(failed, type=pa.list_(pa.string())),
            ]
            arrays.extend(batch.column(name) for name in ("key", "value", *LINEAGE))
            yield pa.RecordBatch.from_arrays(arrays, schema=arrow_schema)

    return inspect


@dataclass(frozen=True)
class ValidationSummary:
    schema: str
    bronze_rows: int
    silver_rows: int
    quarantined: int
    duplicates: int
    by_reason: dict[str, int]
    failed_expectations: dict[str, int]
    data_docs: str

    @property
    def failure_rate(self) -> float:
        """Share of records rejected as invalid (duplicates are not failures)."""
        invalid = self.quarantined - self.duplicates
        return invalid / self.bronze_rows if self.bronze_rows else 0.0


def validate_topic(
    spark: SparkSession,
    lakehouse: Lakehouse,
    schema: RecordSchema,
    *,
    gx_dir: Path,
    echo: Callable[[str], None] = lambda line: None,
) -> ValidationSummary:
    """Route every bronze record of `schema.topic` not yet validated to silver or quarantine."""
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    spark_schema = from_arrow_schema(parsed_arrow_schema(schema))
    silver_path, quarantine_path = lakehouse.silver(schema.name), lakehouse.quarantine(schema.name)
    app_id = f"validate-{schema.name}"
    before = {path: table_version(spark, path) for path in (silver_path, quarantine_path)}
    inspect = inspect_batches(schema)
    id_field = schema.id_field
    typed_columns = [*schema.field_names, *LINEAGE]
    by_reason: dict[str, int] = {}  # rules of this run's rejections (micro-batches run here)
    expectations: dict[str, int] = {}
    report = DataQualityReport(gx_dir, schema)

    def route(batch: DataFrame, batch_id: int) -> None:
        from delta.tables import DeltaTable
        from pyspark.sql import Window

        parsed = batch.mapInArrow(inspect, spark_schema).cache()
        for name, count in report.validate(parsed).items():
            expectations[name] = expectations.get(name, 0) + count
        valid = parsed.where(F.size(REASONS) == 0)
        first = Window.partitionBy(id_field).orderBy("partition", "offset")
        ranked = valid.withColumn("_rank", F.row_number().over(first))
        candidates = ranked.where("_rank = 1").drop("_rank")
        repeated = ranked.where("_rank > 1").drop("_rank")
        if DeltaTable.isDeltaTable(spark, silver_path):
            # An id silver holds from another record is a duplicate; silver holding this very
            # record (same partition and offset) means this batch's silver write already
            # happened: on a replay after a crash, or when Spark re-evaluates this plan after
            # the silver append below. Either way it is not a duplicate of itself.
            known = spark.read.format("delta").load(silver_path).select(
                F.col(id_field), F.col("partition").alias("_kp"), F.col("offset").alias("_ko"))
            matched = candidates.join(known, id_field, "left")
            itself = (F.col("_kp") == F.col("partition")) & (F.col("_ko") == F.col("offset"))
            fresh = matched.where(F.col("_kp").isNull() | itself).drop("_kp", "_ko")
            repeated = repeated.unionByName(
                matched.where(F.col("_kp").isNotNull() & ~itself).drop("_kp", "_ko"))
        else:
            fresh = candidates
        rejected = parsed.where(F.size(REASONS) > 0).unionByName(
            repeated.withColumn(REASONS, F.array(F.lit(f"duplicate:{id_field}")))
            .withColumn(FAILED_EXPECTATIONS, F.array(F.lit(f"{UNIQUE}:{id_field}")))
        )
        quarantine = rejected.select(
            "key", "value", *LINEAGE, REASONS, FAILED_EXPECTATIONS,
            F.current_timestamp().alias("validated_at"),
        )
        for row in rejected.select(F.explode(REASONS).alias("reason")).groupBy(
            F.split("reason", ":")[0].alias("rule")
        ).count().collect():
            by_reason[row["rule"]] = by_reason.get(row["rule"], 0) + int(row["count"])
        for frame, path in ((fresh.select(*typed_columns), silver_path), (quarantine, quarantine_path)):
            (frame.write.format("delta").mode("append")
             .option("txnAppId", app_id).option("txnVersion", batch_id)
             .save(path))
        parsed.unpersist()

    query = (
        spark.readStream.format("delta").load(lakehouse.bronze(schema.topic))
        .writeStream.foreachBatch(route)
        .option("checkpointLocation", lakehouse.checkpoint(app_id))
        .trigger(availableNow=True)
        .start()
    )
    query.awaitTermination()
    silver_rows, _ = appended_since(spark, silver_path, before[silver_path])
    quarantined, _ = appended_since(spark, quarantine_path, before[quarantine_path])
    summary = ValidationSummary(
        schema=schema.name,
        bronze_rows=silver_rows + quarantined,
        silver_rows=silver_rows,
        quarantined=quarantined,
        duplicates=by_reason.get("duplicate", 0),
        by_reason=by_reason,
        failed_expectations=expectations,
        data_docs=report.docs_index,
    )
    echo(f"validate {schema.name}: {summary.bronze_rows} records → {silver_rows} silver, "
         f"{quarantined} quarantined {by_reason}")
    return summary


def check_failure_rate(summaries: list[ValidationSummary], limit: float) -> None:
    """Fail loudly, with the numbers, when a schema's share of invalid records exceeds `limit`.

    The records stay in quarantine either way; duplicates are not failures."""
    failing = [s for s in summaries if s.failure_rate > limit]
    if failing:
        raise DataQualityError("; ".join(
            f"{s.schema}: {s.quarantined - s.duplicates} of {s.bronze_rows} records invalid "
            f"({s.failure_rate:.2%} > LAMBDALAKE_BATCH_MAX_FAILURE_RATE={limit:.2%}), "
            f"by rule {s.by_reason}; they are kept in quarantine" for s in failing))
