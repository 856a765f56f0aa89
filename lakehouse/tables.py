"""Where each Delta table of the lakehouse lives, below the Delta root URI.

    bronze/<topic>        raw Kafka records, immutable: key, value, topic, partition, offset,
                          kafka_timestamp, ingest_time (append-only, exactly once)
    silver/<schema>       typed, validated records, deduplicated by id
    quarantine/<schema>   records that failed validation, with their reasons and raw bytes
    gold/<view>           batch views: monoid states per (entity, bucket)
    training/<spec>       the latest point-in-time training set (features + label per event)
    batch/batch_runs      one row per batch run: boundary offsets, source versions, counts
    speed/scored_events   the speed layer's scored events
    _checkpoints/<name>   Spark Structured Streaming checkpoints

The root may be a local path or an object-store URI (s3a://, abfss://, gs://); paths are
joined with "/" so both work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


@dataclass(frozen=True)
class Lakehouse:
    root: str

    def _join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def bronze(self, topic: str) -> str:
        return self._join("bronze", topic.replace(".", "_"))

    def silver(self, schema: str) -> str:
        return self._join("silver", schema)

    def quarantine(self, schema: str) -> str:
        return self._join("quarantine", schema)

    def gold(self, view: str) -> str:
        return self._join("gold", view)

    def training_set(self, spec: str) -> str:
        return self._join("training", spec)

    @property
    def batch_runs(self) -> str:
        return self._join("batch", "batch_runs")

    @property
    def scored_events(self) -> str:
        return self._join("speed", "scored_events")

    def checkpoint(self, name: str) -> str:
        return self._join("_checkpoints", name)


def appended_since(spark: SparkSession, path: str, version: int | None) -> tuple[int, int]:
    """Rows and commits appended to a Delta table after `version` (None: since creation)."""
    from delta.tables import DeltaTable

    if not DeltaTable.isDeltaTable(spark, path):
        return 0, 0
    history = DeltaTable.forPath(spark, path).history().collect()
    commits = [h for h in history if version is None or h["version"] > version]
    rows = sum(int((h["operationMetrics"] or {}).get("numOutputRows", 0)) for h in commits)
    return rows, sum(1 for h in commits if h["operation"] == "STREAMING UPDATE")


def table_version(spark: SparkSession, path: str) -> int | None:
    """The latest version of a Delta table; None where no table exists yet."""
    from delta.tables import DeltaTable

    if not DeltaTable.isDeltaTable(spark, path):
        return None
    return int(DeltaTable.forPath(spark, path).history(1).collect()[0]["version"])


def last_commit(spark: SparkSession, path: str) -> tuple[int, int]:
    """(version, rows written) of the latest commit of a Delta table, from its log alone."""
    from delta.tables import DeltaTable

    latest = DeltaTable.forPath(spark, path).history(1).collect()[0]
    return int(latest["version"]), int((latest["operationMetrics"] or {}).get("numOutputRows", 0))
