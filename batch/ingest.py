"""Ingest: Kafka topics into the immutable bronze Delta tables, exactly once.

One Spark Structured Streaming query per topic reads from the earliest offset not yet
ingested and appends the raw records to `bronze/<topic>` with `trigger(availableNow=True)`:
it processes what the topic holds when the run starts, then stops. Exactly once comes from
Spark's checkpoint (offsets planned per micro-batch, written before the batch) together with
the Delta sink, which records each micro-batch id in the table's transaction log and skips a
batch it has already committed. A run killed at any point and run again therefore writes each
(partition, offset) exactly once.

Bronze keeps the record as it arrived: key and value bytes, topic, partition, offset, the
Kafka timestamp, and the time of ingestion (UTC). Nothing is parsed or dropped here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lakehouse.errors import ServiceError
from lakehouse.tables import Lakehouse, appended_since, table_version

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

@dataclass(frozen=True)
class TopicIngest:
    """What one run added to one bronze table."""

    topic: str
    rows: int
    micro_batches: int
    table_version: int | None


def ingest_topics(
    spark: SparkSession,
    lakehouse: Lakehouse,
    *,
    bootstrap_servers: str,
    topics: Sequence[str],
    kafka_options: Mapping[str, str] | None = None,
    max_offsets_per_trigger: int | None = None,
    echo: Callable[[str], None] = lambda line: None,
) -> list[TopicIngest]:
    """Append every new record of each topic to its bronze table; return what was added.
    `kafka_options`: the Kafka source's security options, `lakehouse.streams.spark_kafka_options`
    (none: a PLAINTEXT broker)."""
    return [
        _ingest_topic(spark, lakehouse, bootstrap_servers=bootstrap_servers, topic=topic,
                      kafka_options=kafka_options or {},
                      max_offsets_per_trigger=max_offsets_per_trigger, echo=echo)
        for topic in topics
    ]


def _ingest_topic(
    spark: SparkSession,
    lakehouse: Lakehouse,
    *,
    bootstrap_servers: str,
    topic: str,
    kafka_options: Mapping[str, str],
    max_offsets_per_trigger: int | None,
    echo: Callable[[str], None],
) -> TopicIngest:
    from pyspark.errors import PySparkException
    from pyspark.sql import functions as F

    reader = (
        spark.readStream.format("kafka")
        .option("kafka.bootstrap.servers", bootstrap_servers)
        .options(**kafka_options)
        .option("subscribe", topic)
        .option("startingOffsets", "earliest")
        # offsets that expired from Kafka before ingestion are a loss we must hear about
        .option("failOnDataLoss", "true")
    )
    before = table_version(spark, lakehouse.bronze(topic))
    if max_offsets_per_trigger:
        reader = reader.option("maxOffsetsPerTrigger", str(max_offsets_per_trigger))
    records = reader.load().select(
        "key",
        "value",
        "topic",
        "partition",
        "offset",
        F.col("timestamp").alias("kafka_timestamp"),
        F.current_timestamp().alias("ingest_time"),
    )
    query = (
        records.writeStream.format("delta")
        .outputMode("append")
        .option("checkpointLocation", lakehouse.checkpoint(f"ingest-{topic}"))
        .queryName(f"ingest-{topic}")
        .trigger(availableNow=True)
        .start(lakehouse.bronze(topic))
    )
    try:
        query.awaitTermination()
    except PySparkException as exc:
        raise ServiceError(f"ingesting topic {topic!r} failed: {exc}") from None
    version = table_version(spark, lakehouse.bronze(topic))
    rows, batches = appended_since(spark, lakehouse.bronze(topic), before)
    echo(f"ingest {topic}: {rows} new records in {batches} micro-batches (bronze v{version})")
    return TopicIngest(topic=topic, rows=rows, micro_batches=batches, table_version=version)
