"""Validate: each new bronze slice into silver (typed, deduplicated) and quarantine.

Every bronze record is checked with the spec's single validation routine
(`RecordSchema.inspect`, which `parse` in the speed layer shares), run inside Spark through
`mapInArrow`; the Great Expectations suite derived from the same spec runs on the slice and
keeps the Data Docs. A record lands in exactly one place:
- silver/<schema>: the typed record (money in integer cents, timestamps as UTC timestamps)
  with its Kafka partition and offset, once per (key entity, id) (`RecordSchema.dedup_scope`,
  the scope the speed layer applies too): the first arrival (lowest offset) wins, and a
  record is a duplicate only of another record (partition, offset), never of itself;
- quarantine/<schema>: the raw record (key, value bytes, topic, partition, offset) with the
  list of reasons it was rejected (`<rule>:<field>`, or `duplicate:<id field>` for a later
  arrival of an id silver already has).
So bronze row count = silver + quarantine, always: nothing is dropped silently.

New slices are found by reading bronze as a Delta stream with `trigger(availableNow=True)`;
each micro-batch writes silver and quarantine with Delta app transactions keyed by the
micro-batch id, so a killed run, replayed, writes nothing twice.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from batch.expectations import (
    ENVELOPE_OK,
    JSON_OBJECT,
    UNKNOWN_FIELDS,
    DataQualityReport,
    duplicate_expectation,
    expectation_for,
)
from lakehouse.errors import BatchError, DataQualityError
from lakehouse.spec import RecordSchema
from lakehouse.tables import Lakehouse, appended_since, table_version
from lakehouse.types import arrow_type, typed_arrow_schema

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

REASONS = "reasons"
FAILED_EXPECTATIONS = "failed_expectations"
LINEAGE = ("topic", "partition", "offset", "kafka_timestamp", "ingest_time")

def parsed_arrow_schema(schema: RecordSchema) -> pa.Schema:
    """Inspected fields, the data-quality columns, the reasons, then the raw record."""
    return pa.schema(
        list(typed_arrow_schema(schema))
        + [
            pa.field(JSON_OBJECT, pa.bool_()),
            pa.field(UNKNOWN_FIELDS, pa.int32()),
            pa.field(ENVELOPE_OK, pa.bool_()),
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

    Field columns hold each value as far as it could be read (see `RecordSchema.inspect`,
    given the record's Kafka key and timestamp, as the speed layer gives them); a row is
    valid when its `reasons` are empty. A record without a value (a tombstone) is inspected
    as such, not as empty bytes."""
    arrow_schema = parsed_arrow_schema(schema)
    names = schema.field_names
    timestamps = {f.name for f in schema.fields if f.type == "timestamp"}

    def inspect(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            columns: dict[str, list[Any]] = {name: [] for name in names}
            objects, unknown, envelopes, reasons, failed = [], [], [], [], []
            arrivals = batch.column("kafka_timestamp").cast(pa.int64()).to_pylist()  # µs
            for raw, key, arrival_us in zip(batch.column("value").to_pylist(),
                                            batch.column("key").to_pylist(), arrivals, strict=True):
                found = schema.inspect(raw, key=key,
                                       arrival_ms=None if arrival_us is None else arrival_us // 1000)
                for name in names:
                    value = found.values.get(name)
                    if name in timestamps and value is not None:
                        value *= 1000  # epoch ms → µs
                    columns[name].append(value)
                objects.append(found.is_object)
                unknown.append(found.unknown_fields)
                envelopes.append(found.envelope_ok)
                reasons.append(found.reasons)
                failed.append(sorted({expectation_for(r, schema) for r in found.reasons}))
            arrays = [pa.array(columns[f.name], type=arrow_type(f)) for f in schema.fields]
            arrays += [
                pa.array(objects, type=pa.bool_()),
                pa.array(unknown, type=pa.int32()),
                pa.array(envelopes, type=pa.bool_()),
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
    max_failure_rate: float | None = None,
    echo: Callable[[str], None] = lambda line: None,
) -> ValidationSummary:
    """Route every bronze record of `schema.topic` not yet validated to silver or quarantine.

    The failure-rate gate (`max_failure_rate`, None: no gate) judges each slice (one
    micro-batch of the validate stream) before anything of it is written: a slice whose
    share of invalid records exceeds the limit raises DataQualityError with its numbers and
    writes nothing, so the stream's checkpoint stays before it and every retry meets the
    same slice and fails the same way, until an operator accepts it
    (`lambdalake batch accept <slice>`, `accept_slice`). Duplicates are not failures."""
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    spark_schema = from_arrow_schema(parsed_arrow_schema(schema))
    silver_path, quarantine_path = lakehouse.silver(schema.name), lakehouse.quarantine(schema.name)
    app_id = f"validate-{schema.name}"
    before = {path: table_version(spark, path) for path in (silver_path, quarantine_path)}
    inspect = inspect_batches(schema)
    id_field = schema.id_field
    dedup_columns = [schema.key_field, id_field]  # RecordSchema.dedup_key
    typed_columns = [*schema.field_names, *LINEAGE]
    by_reason: dict[str, int] = {}  # rules of this run's rejections (micro-batches run here)
    expectations: dict[str, int] = {}
    report = DataQualityReport(gx_dir, schema)
    blocked: list[DataQualityError] = []

    def route(batch: DataFrame, batch_id: int) -> None:
        from delta.tables import DeltaTable
        from pyspark.sql import Window

        parsed = batch.mapInArrow(inspect, spark_schema).cache()
        if max_failure_rate is not None:
            try:
                _gate(lakehouse, schema, parsed, batch_id, max_failure_rate)
            except DataQualityError as refused:
                parsed.unpersist()
                blocked.append(refused)
                raise
        for name, count in report.validate(parsed).items():
            expectations[name] = expectations.get(name, 0) + count
        valid = parsed.where(F.size(REASONS) == 0)
        first = Window.partitionBy(*dedup_columns).orderBy("partition", "offset")
        ranked = valid.withColumn("_rank", F.row_number().over(first))
        candidates = ranked.where("_rank = 1").drop("_rank")
        repeated = ranked.where("_rank > 1").drop("_rank")
        if DeltaTable.isDeltaTable(spark, silver_path):
            # An id silver holds from another record is a duplicate; silver holding this very
            # record (same partition and offset) means this batch's silver write already
            # happened: on a replay after a crash, or when Spark re-evaluates this plan after
            # the silver append below. Either way it is not a duplicate of itself.
            known = spark.read.format("delta").load(silver_path).select(
                *dedup_columns, F.col("partition").alias("_kp"), F.col("offset").alias("_ko"))
            matched = candidates.join(known, dedup_columns, "left")
            itself = (F.col("_kp") == F.col("partition")) & (F.col("_ko") == F.col("offset"))
            fresh = matched.where(F.col("_kp").isNull() | itself).drop("_kp", "_ko")
            repeated = repeated.unionByName(
                matched.where(F.col("_kp").isNotNull() & ~itself).drop("_kp", "_ko"))
        else:
            fresh = candidates
        rejected = parsed.where(F.size(REASONS) > 0).unionByName(
            repeated.withColumn(REASONS, F.array(F.lit(f"duplicate:{id_field}")))
            .withColumn(FAILED_EXPECTATIONS, F.array(F.lit(duplicate_expectation(schema))))
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

    from pyspark.errors import PySparkException

    try:
        query = (
            spark.readStream.format("delta").load(lakehouse.bronze(schema.topic))
            .writeStream.foreachBatch(route)
            .option("checkpointLocation", lakehouse.checkpoint(app_id))
            .trigger(availableNow=True)
            .start()
        )
    except PySparkException as exc:
        raise BatchError(f"cannot validate topic {schema.topic!r}: {_first_line(exc)} (has "
                         "`lambdalake batch ingest` written its bronze table?)") from exc
    try:
        query.awaitTermination()
    except Exception as exc:
        if blocked:  # the gate's own error, not Spark's wrapping of it
            raise blocked[0] from None
        if isinstance(exc, PySparkException):
            raise BatchError(f"validating topic {schema.topic!r} failed: {_first_line(exc)}") from exc
        raise
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


@dataclass(frozen=True)
class SliceCheck:
    """The failure-rate gate's view of one slice: its records, how many are invalid (by rule;
    duplicates are judged later and never count), and where it lies in bronze."""

    schema: str
    slice_id: str
    rows: int
    invalid: int
    by_rule: dict[str, int]
    offsets: dict[int, tuple[int, int]]  # partition → (first, last) bronze offset

    @property
    def failure_rate(self) -> float:
        return self.invalid / self.rows if self.rows else 0.0


def _first_line(exc: BaseException) -> str:
    """The first line of an error's message (Spark's go on with a JVM stack trace)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def slice_id(schema: RecordSchema, batch_id: int, offsets: dict[int, tuple[int, int]]) -> str:
    """`<schema>/<micro-batch>-<digest of its bronze offsets>`: the same slice on every retry,
    and a different name for other records (a reset checkpoint cannot reuse an acceptance)."""
    described = ",".join(f"{p}:{a}-{b}" for p, (a, b) in sorted(offsets.items()))
    return f"{schema.name}/{batch_id}-{hashlib.sha256(described.encode()).hexdigest()[:10]}"


def check_failure_rate(check: SliceCheck, limit: float, *, accepted: bool) -> None:
    """Refuse, with the numbers and the command that accepts it, a slice above the limit."""
    if check.failure_rate <= limit or accepted:
        return
    where = ", ".join(f"partition {p} offsets {a}..{b}" for p, (a, b) in sorted(check.offsets.items()))
    raise DataQualityError(
        f"{check.schema}: slice {check.slice_id} has {check.invalid} of {check.rows} records invalid "
        f"({check.failure_rate:.2%} > LAMBDALAKE_BATCH_MAX_FAILURE_RATE={limit:.2%}), by rule "
        f"{check.by_rule}; nothing of it was written to silver or quarantine, and later slices "
        f"wait behind it ({where} of bronze). Inspect them, then accept the slice with "
        f"`lambdalake batch accept {check.slice_id}` (its records go to silver and quarantine "
        f"as usual), or fix the producer and raise the limit.")


def _gate(lakehouse: Lakehouse, schema: RecordSchema, parsed: DataFrame, batch_id: int,
          limit: float) -> None:
    from pyspark.sql import functions as F

    by_partition = parsed.groupBy("partition").agg(
        F.min("offset").alias("first"), F.max("offset").alias("last"), F.count("*").alias("rows"),
        F.sum(F.when(F.size(REASONS) > 0, 1).otherwise(0)).alias("invalid")).collect()
    offsets = {int(r["partition"]): (int(r["first"]), int(r["last"])) for r in by_partition}
    rows = sum(int(r["rows"]) for r in by_partition)
    invalid = sum(int(r["invalid"]) for r in by_partition)
    if not rows or invalid / rows <= limit:
        return
    by_rule = {r["rule"]: int(r["count"]) for r in parsed.select(F.explode(REASONS).alias("reason"))
               .select(F.split("reason", ":")[0].alias("rule")).groupBy("rule").count().collect()}
    check = SliceCheck(schema.name, slice_id(schema, batch_id, offsets), rows, invalid, by_rule, offsets)
    check_failure_rate(check, limit, accepted=check.slice_id in accepted_slices(lakehouse))


ACCEPTED_SCHEMA = pa.schema([
    pa.field("slice_id", pa.string(), nullable=False),
    pa.field("accepted_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("accepted_by", pa.string(), nullable=False),
    pa.field("note", pa.string()),
])


def accepted_slices(lakehouse: Lakehouse) -> set[str]:
    """Slices an operator accepted above the failure-rate limit."""
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(lakehouse.accepted_slices):
        return set()
    return set(DeltaTable(lakehouse.accepted_slices).to_pyarrow_table(columns=["slice_id"])
               .column("slice_id").to_pylist())


def accept_slice(lakehouse: Lakehouse, slice_id: str, *, accepted_by: str, note: str = "") -> None:
    """Record that a slice may pass the failure-rate gate (the next validate run writes it)."""
    from deltalake import write_deltalake

    if not _SLICE_ID.match(slice_id):
        raise DataQualityError(f"{slice_id!r} is no slice id: the validate error names it, as "
                               "<schema>/<micro-batch>-<digest>, e.g. transaction/3-1a2b3c4d5e")
    row = {"slice_id": slice_id, "accepted_at": datetime.now(UTC), "accepted_by": accepted_by,
           "note": note}
    write_deltalake(lakehouse.accepted_slices, pa.Table.from_pylist([row], schema=ACCEPTED_SCHEMA),
                    mode="append")


_SLICE_ID = re.compile(r"^[A-Za-z0-9_.-]+/\d+-[0-9a-f]{10}$")
