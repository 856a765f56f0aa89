"""The batch layer's jobs, one function per step, as Airflow tasks and `lambdalake batch`
call them.

Each step comes twice: `run_<step>` does it with the packages' own functions and returns
what they return (the CLI prints those), and `<step>` returns a small JSON-able summary of
it (an XCom). Spark steps share the process's Spark session (`spark_session` builds it once);
Airflow runs each task in its own process, so a DAG of Spark steps pays one session start
(~10 s) per task. Rolling the trained model out to the model service is not a batch step:
it lives above the layers, in `infra/rollout.py`. The `run_<step>` result types are named
here too (`__all__`), so callers outside the batch layer need no other batch module.
"""

from __future__ import annotations

import getpass
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from batch.drift import detect_drift
from batch.ingest import TopicIngest, ingest_topics
from batch.maintenance import maintain
from batch.train import TrainOptions, TrainResult, train_model
from batch.training_set import TrainingSet, build_training_set
from batch.validate import ValidationSummary, accept_slice, validate_topic
from batch.views import compute_views
from lakehouse.config import Settings
from lakehouse.errors import BatchError
from lakehouse.online import open_store
from lakehouse.spark import spark_session
from lakehouse.spec import PlatformSpec, RecordSchema
from lakehouse.streams import spark_kafka_options, topic_partitions
from lakehouse.tables import BatchRun, Lakehouse, latest_run

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["BatchRun", "Echo", "TopicIngest", "TrainResult", "TrainingSet", "ValidationSummary",
           "accept", "drift", "ingest", "maintenance", "run_ingest", "run_train", "run_validate",
           "run_views", "train", "training_set", "validate", "views"]

Echo = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)  # noqa: T201 - task logs


def run_ingest(settings: Settings, spec: PlatformSpec, *, spark: SparkSession | None = None,
               topics: list[str] | None = None, max_offsets_per_trigger: int | None = None,
               echo: Echo = _print) -> list[TopicIngest]:
    """Append every new Kafka record of `topics` (default: the spec's events and labels) to
    the bronze Delta tables, exactly once."""
    return ingest_topics(spark or spark_session(settings), Lakehouse(settings.delta_uri),
                         bootstrap_servers=settings.kafka_bootstrap_servers,
                         kafka_options=spark_kafka_options(settings),
                         topics=topics or [spec.events.topic, spec.labels.topic],
                         max_offsets_per_trigger=max_offsets_per_trigger, echo=echo)


def ingest(settings: Settings, spec: PlatformSpec, echo: Echo = _print, *,
           spark: SparkSession | None = None, topics: list[str] | None = None,
           max_offsets_per_trigger: int | None = None) -> dict[str, Any]:
    added = run_ingest(settings, spec, spark=spark, topics=topics,
                       max_offsets_per_trigger=max_offsets_per_trigger, echo=echo)
    return {a.topic: a.rows for a in added}


def run_validate(settings: Settings, spec: PlatformSpec, *, spark: SparkSession | None = None,
                 schemas: list[RecordSchema] | None = None, echo: Echo = _print) -> list[ValidationSummary]:
    """`schemas` (default: events and labels); a slice above the configured failure rate is
    refused, unwritten (see `validate_topic`), until `accept` lets it through."""
    spark, lakehouse = spark or spark_session(settings), Lakehouse(settings.delta_uri)
    gx_dir = settings.state_path / "great_expectations"
    return [validate_topic(spark, lakehouse, schema, gx_dir=gx_dir,
                           max_failure_rate=settings.batch_max_failure_rate, echo=echo)
            for schema in (schemas or [spec.events, spec.labels])]


def validate(settings: Settings, spec: PlatformSpec, echo: Echo = _print, *,
             spark: SparkSession | None = None) -> dict[str, Any]:
    summaries = run_validate(settings, spec, spark=spark, echo=echo)
    return {s.schema: {"silver": s.silver_rows, "quarantined": s.quarantined, "duplicates": s.duplicates,
                       "failure_rate": round(s.failure_rate, 6)} for s in summaries}


def accept(settings: Settings, slice_id: str, *, note: str = "", echo: Echo = _print) -> dict[str, Any]:
    """Let a slice the failure-rate gate refused through at the next validate run."""
    accept_slice(Lakehouse(settings.delta_uri), slice_id, accepted_by=getpass.getuser(), note=note)
    echo(f"accepted {slice_id}: the next validate run writes it to silver and quarantine")
    return {"accepted": slice_id}


def run_views(settings: Settings, spec: PlatformSpec, *, spark: SparkSession | None = None,
              echo: Echo = _print) -> BatchRun:
    """Cut the speed layer's online store, recompute the views up to the cut (catching
    silver up to it with an ingest + validate of the events topic where the speed layer
    applied beyond validation) and publish the run (the boundary)."""
    spark = spark or spark_session(settings)

    def catch_up() -> None:
        run_ingest(settings, spec, spark=spark, topics=[spec.events.topic], echo=echo)
        run_validate(settings, spec, spark=spark, schemas=[spec.events], echo=echo)

    return compute_views(spark, Lakehouse(settings.delta_uri), spec, store=open_store(settings, spec),
                         partitions=topic_partitions(settings, spec.events.topic), catch_up=catch_up,
                         echo=echo)


def views(settings: Settings, spec: PlatformSpec, echo: Echo = _print, *,
          spark: SparkSession | None = None) -> dict[str, Any]:
    run = run_views(settings, spec, spark=spark, echo=echo)
    return {"batch_run_id": run.run_id, "boundary": {str(p): o for p, o in run.boundary.items()},
            "cut_epochs": {str(p): e for p, e in run.cut_epochs.items()}, "row_counts": run.row_counts}


def training_set(settings: Settings, spec: PlatformSpec, echo: Echo = _print, *,
                 spark: SparkSession | None = None,
                 label_cutoff_ms: int | None = None) -> dict[str, Any]:
    """Point-in-time training set of the latest published batch run (labels known at
    `label_cutoff_ms`, default every label ingested)."""
    lakehouse = Lakehouse(settings.delta_uri)
    run = latest_run(lakehouse)
    if run is None:
        raise BatchError("no published batch run: run the lambdalake_batch DAG first")
    return asdict(build_training_set(spark or spark_session(settings), lakehouse, spec, run,
                                     label_cutoff_ms=label_cutoff_ms, group=settings.speed_group,
                                     echo=echo))


def run_train(settings: Settings, spec: PlatformSpec, *, spark: SparkSession | None = None,
              built: TrainingSet | None = None, label_cutoff_ms: int | None = None,
              epochs: int | None = None, max_train_rows: int | None = None,
              echo: Echo = _print) -> TrainResult:
    """Train (on `built`, or on a training set built now with labels known at
    `label_cutoff_ms`), evaluate, register and promote. `epochs` and `max_train_rows`
    override the settings' training options."""
    options = TrainOptions.from_settings(settings, epochs=epochs, max_train_rows=max_train_rows)
    return train_model(spark or spark_session(settings), settings, spec, options=options,
                       label_cutoff_ms=label_cutoff_ms, training_set=built, echo=echo)


def train(settings: Settings, spec: PlatformSpec, built: dict[str, Any], echo: Echo = _print, *,
          spark: SparkSession | None = None) -> dict[str, Any]:
    """Train on a training set `training_set` wrote; evaluate, register and promote."""
    built = {**built, "feature_names": tuple(built["feature_names"])}
    return run_train(settings, spec, spark=spark, built=TrainingSet(**built), echo=echo).summary()


def drift(settings: Settings, spec: PlatformSpec, echo: Echo = _print) -> dict[str, Any]:
    report = detect_drift(settings, spec)
    echo(f"drift: {report.reason} ({report.current_rows} events scored in the window, plots in "
         f"{report.plots_dir})")
    return report.summary()


def maintenance(settings: Settings, spec: PlatformSpec, echo: Echo = _print) -> list[dict[str, Any]]:
    return [asdict(u) for u in maintain(Lakehouse(settings.delta_uri), spec,
                                        retention_hours=settings.delta_vacuum_retention_hours,
                                        allow_unsafe_retention=settings.delta_vacuum_allow_unsafe_retention,
                                        echo=echo)]
