"""Validate: each new bronze slice into silver (typed, deduplicated) and quarantine.

Every bronze record is checked with the spec's single validation routine
(`RecordSchema.inspect`, which `parse` in the speed layer shares), run inside Spark through
`mapInArrow`; the Great Expectations suite derived from the same spec runs on the slice and
keeps the Data Docs. A record lands in exactly one place:
- silver/<schema>: the typed record (money in integer cents, timestamps as UTC timestamps)
  with its Kafka partition, offset and `arrival_clock`, once per (key entity, id) within the
  schema's dedup horizon (`lakehouse.dedup`, the rule the speed layer applies too): the
  first arrival (lowest offset) wins, and a record is a duplicate only of another record
  (partition, offset), never of itself;
- quarantine/<schema>: the raw record (key, value bytes, topic, partition, offset) with the
  list of reasons it was rejected (`<rule>:<field>`, or `duplicate:<id field>` for a later
  arrival, within the horizon, of an id silver already has).
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
from lakehouse.dedup import CLOCK, NO_CLOCK, Dedup
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
    typed_columns = [*schema.field_names, *LINEAGE, CLOCK]
    by_reason: dict[str, int] = {}  # rules of this run's rejections (micro-batches run here)
    expectations: dict[str, int] = {}
    report = DataQualityReport(gx_dir, schema)
    blocked: list[DataQualityError] = []

    def route(batch: DataFrame, batch_id: int) -> None:
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
        fresh, repeated = _deduplicate(spark, valid, silver_path, schema)
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
             .option("mergeSchema", "true")  # silver of an older version lacks arrival_clock
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


def _deduplicate(spark: SparkSession, valid: DataFrame, silver_path: str,
                 schema: RecordSchema) -> tuple[DataFrame, DataFrame]:
    """(events, duplicates) of a slice's valid records, by the rule of `lakehouse.dedup`,
    continuing from what silver holds.

    Silver is read only within the horizon of the slice's oldest Kafka timestamp: an event
    taken before that can have no copy in the slice (the clock never goes back), and the
    partition's clock is the latest silver clock there, or the slice's own timestamps when
    silver has none there. `arrival_clock` is appended in time order, so Delta's file
    statistics skip the rest: the read costs one horizon of events, not the history. Rows
    silver already holds from this very slice (a replay after a crash, or Spark evaluating
    the plan again after the silver write) are left out of what was judged before."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    key_columns = [schema.key_field, schema.id_field]  # RecordSchema.dedup_key
    starts = {int(r["partition"]): (int(r["first"]), r["oldest"]) for r in valid.groupBy("partition").agg(
        F.min("offset").alias("first"), F.unix_micros(F.min("kafka_timestamp")).alias("oldest")).collect()}
    if not starts:
        return valid.withColumn(CLOCK, F.col("kafka_timestamp")), valid
    judged = valid.withColumn(_KNOWN, F.lit(None).cast("timestamp"))
    clocks: dict[int, int] = {}
    if DeltaTable.isDeltaTable(spark, silver_path):
        first = F.create_map(*[F.lit(x) for p, (o, _) in sorted(starts.items()) for x in (p, o)])
        before = spark.read.format("delta").load(silver_path)
        if CLOCK not in before.columns:  # silver written before arrival clocks
            before = before.withColumn(CLOCK, F.col("kafka_timestamp"))
        before = before.where(F.col("offset") < F.coalesce(first[F.col("partition")], F.lit(2**62)))
        oldest = [o for _, o in starts.values() if o is not None]
        if schema.dedup_horizon_ms is not None and oldest:
            since_us = min(oldest) - schema.dedup_horizon_ms * 1000
            # a literal timestamp, so that Delta skips the files whose clocks all lie below
            before = before.where(F.col(CLOCK) >= F.timestamp_micros(F.lit(since_us)))
        clocks = {int(r["partition"]): int(r["clock"]) // 1000 for r in before.groupBy("partition")
                  .agg(F.unix_micros(F.max(CLOCK)).alias("clock")).collect() if r["clock"] is not None}
        latest = before.groupBy(*key_columns).agg(F.max(CLOCK).alias(_KNOWN))
        judged = valid.join(latest, key_columns, "left")
    out_schema = judged.schema.add(CLOCK, "timestamp").add(_TAKEN, "boolean")
    judged = (judged.repartition("partition").sortWithinPartitions("partition", "offset")
              .mapInArrow(_judge_batches(schema, clocks), out_schema))
    events = judged.where(F.col(_TAKEN)).drop(_KNOWN, _TAKEN)
    duplicates = judged.where(~F.col(_TAKEN)).drop(_KNOWN, _TAKEN, CLOCK)
    return events, duplicates


_KNOWN, _TAKEN = "_known_clock", "_taken"


def _judge_batches(schema: RecordSchema, clocks: dict[int, int]
                   ) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """A mapInArrow function over valid records sorted by (partition, offset), each with the
    clock of silver's latest copy of its identity within the horizon (`_known_clock`): the
    rule (`lakehouse.dedup.Dedup`) applied in offset order, per partition from its clock in
    silver (`clocks`); adds each record's clock and whether it is taken."""
    def judge(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        rules: dict[int, Dedup] = {}
        judged = 0
        for batch in batches:
            data = batch.to_pydict()
            taken, at = [], []
            for p, key, event_id, kafka_us, known_us in zip(
                    data["partition"], data[schema.key_field], data[schema.id_field],
                    _micros(batch, "kafka_timestamp"), _micros(batch, _KNOWN), strict=True):
                rule = rules.get(p)
                if rule is None:
                    rule = rules[p] = Dedup(schema.dedup_horizon_ms, clock=clocks.get(p, NO_CLOCK))
                identity = (key, event_id)
                if known_us is not None and identity not in rule.taken:
                    rule.taken[identity] = known_us // 1000
                clock = rule.judge(identity, None if kafka_us is None else kafka_us // 1000)
                taken.append(clock is not None)
                at.append(rule.clock * 1000 if clock is None else clock * 1000)
                judged += 1
                if judged % 50_000 == 0:  # a big slice: keep one horizon of identities
                    for each in rules.values():
                        each.forget_expired()
            yield batch.append_column(CLOCK, pa.array(at, pa.int64()).cast(pa.timestamp("us", tz="UTC"))) \
                .append_column(_TAKEN, pa.array(taken, pa.bool_()))
    return judge


def _micros(batch: pa.RecordBatch, column: str) -> list[int | None]:
    """A timestamp column as epoch microseconds."""
    values: list[int | None] = batch.column(column).cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_pylist()
    return values


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
