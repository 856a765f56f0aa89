"""Spark with Delta Lake and delta-rs (`deltalake`) read each other's tables."""

from __future__ import annotations

import uuid

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from lakehouse.config import Settings

pytestmark = pytest.mark.integration


def _table_path(settings: Settings, name: str) -> str:
    return f"{settings.delta_uri}/tests/{name}-{uuid.uuid4().hex[:8]}"


def test_spark_writes_deltalake_reads(spark, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    path = _table_path(settings, "spark-to-rs")
    rows = [(i, f"user-{i % 7}", i * 125) for i in range(1000)]
    frame = spark.createDataFrame(rows, "event_id long, user_id string, amount_cents long")
    frame.write.format("delta").mode("append").save(path)
    spark.createDataFrame(rows[:10], frame.schema).write.format("delta").mode("append").save(path)

    table = DeltaTable(path)
    assert table.version() == 1
    read = table.to_pyarrow_table().to_pylist()
    assert len(read) == 1010
    assert sorted((r["event_id"], r["user_id"], r["amount_cents"]) for r in read) == sorted(
        rows + rows[:10]
    )


def test_deltalake_writes_spark_reads(spark, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    path = _table_path(settings, "rs-to-spark")
    data = pa.table({
        "user_id": [f"user-{i % 5}" for i in range(500)],
        "amount_cents": pa.array(range(500), type=pa.int64()),
    })
    write_deltalake(path, data, mode="append")
    write_deltalake(path, data.slice(0, 100), mode="append")

    frame = spark.read.format("delta").load(path)
    assert frame.count() == 600
    totals = {r["user_id"]: r["total"] for r in frame.groupBy("user_id").agg({"amount_cents": "sum"})
              .withColumnRenamed("sum(amount_cents)", "total").collect()}
    expected: dict[str, int] = {}
    for user, amount in zip(data.column("user_id").to_pylist() + data.column("user_id").to_pylist()[:100],
                            list(range(500)) + list(range(100)), strict=True):
        expected[user] = expected.get(user, 0) + amount
    assert totals == expected
    history = spark.sql(f"DESCRIBE HISTORY delta.`{path}`").collect()
    assert len(history) == 2
