"""The platform's scheduled jobs, one function per step, as Airflow tasks call them.

Each takes the settings and the spec, does one step with the packages' own functions, and
returns a small JSON-able summary (an XCom). Spark steps share the process's Spark session;
Airflow runs each task in its own process, so a DAG of Spark steps pays one session start
(~10 s) per task. `lambdalake batch ...` runs the same functions.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from lakehouse.config import Settings
from lakehouse.errors import PlatformError
from lakehouse.spec import PlatformSpec
from lakehouse.tables import Lakehouse

Echo = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)  # noqa: T201 - task logs


def _spark(settings: Settings):  # type: ignore[no-untyped-def]
    from lakehouse.spark import spark_session

    return spark_session(settings)


def ingest(settings: Settings, spec: PlatformSpec, echo: Echo = _print) -> dict[str, Any]:
    from batch.ingest import ingest_topics
    from lakehouse.streams import spark_kafka_options

    added = ingest_topics(_spark(settings), Lakehouse(settings.delta_uri),
                          bootstrap_servers=settings.kafka_bootstrap_servers,
                          kafka_options=spark_kafka_options(settings),
                          topics=[spec.events.topic, spec.labels.topic], echo=echo)
    return {a.topic: a.rows for a in added}


def validate(settings: Settings, spec: PlatformSpec, echo: Echo = _print) -> dict[str, Any]:
    """Events and labels; a slice above the configured failure rate is refused, unwritten
    (see `validate_topic`), until `accept` lets it through."""
    from batch.validate import validate_topic

    spark, lakehouse = _spark(settings), Lakehouse(settings.delta_uri)
    gx_dir = settings.state_path / "great_expectations"
    summaries = [validate_topic(spark, lakehouse, schema, gx_dir=gx_dir,
                                max_failure_rate=settings.batch_max_failure_rate, echo=echo)
                 for schema in (spec.events, spec.labels)]
    return {s.schema: {"silver": s.silver_rows, "quarantined": s.quarantined, "duplicates": s.duplicates,
                       "failure_rate": round(s.failure_rate, 6)} for s in summaries}


def accept(settings: Settings, slice_id: str, *, note: str = "", echo: Echo = _print) -> dict[str, Any]:
    """Let a slice the failure-rate gate refused through at the next validate run."""
    import getpass

    from batch.validate import accept_slice

    accept_slice(Lakehouse(settings.delta_uri), slice_id, accepted_by=getpass.getuser(), note=note)
    echo(f"accepted {slice_id}: the next validate run writes it to silver and quarantine")
    return {"accepted": slice_id}


def views(settings: Settings, spec: PlatformSpec, echo: Echo = _print) -> dict[str, Any]:
    """Recompute the views and publish the run (the boundary)."""
    from batch.views import compute_views

    run = compute_views(_spark(settings), Lakehouse(settings.delta_uri), spec, echo=echo)
    return {"batch_run_id": run.run_id, "boundary": {str(p): o for p, o in run.boundary.items()},
            "row_counts": run.row_counts}


def training_set(settings: Settings, spec: PlatformSpec, echo: Echo = _print) -> dict[str, Any]:
    from batch.training_set import build_training_set
    from lakehouse.tables import latest_run

    spark, lakehouse = _spark(settings), Lakehouse(settings.delta_uri)
    run = latest_run(lakehouse)
    if run is None:
        raise PlatformError("no published batch run: run the lambdalake_batch DAG first")
    return asdict(build_training_set(spark, lakehouse, spec, run, echo=echo))


def train(settings: Settings, spec: PlatformSpec, built: dict[str, Any], echo: Echo = _print) -> dict[str, Any]:
    """Train on a training set `training_set` wrote; evaluate, register and promote."""
    from batch.train import train_model
    from batch.training_set import TrainingSet

    built = {**built, "feature_names": tuple(built["feature_names"])}
    result = train_model(_spark(settings), settings, spec, training_set=TrainingSet(**built), echo=echo)
    return result.summary()


def roll_out(settings: Settings, trained: dict[str, Any], echo: Echo = _print,
             timeout_s: float = 300.0) -> dict[str, Any]:
    """Make the model service serve the champion: deploy it if it is not running, else wait
    until its registry poller has swapped the new champion in."""
    from infra.services import ray_local_env

    os.environ.update(ray_local_env(settings))  # before Ray is imported
    import ray
    from ray import serve

    from speed.model_service import APP_NAME, ServiceArgs, serve_on_ray

    if not ray.is_initialized():
        ray.init(address=settings.ray_address, log_to_driver=False)
    if APP_NAME not in serve.status().applications:
        info = serve_on_ray(settings.ray_address, ServiceArgs.from_settings(settings))
        echo(f"deployed the model service: v{info['version']}")
        return {"served_version": info["version"], "deployed": True}
    if trained.get("alias") != "champion":
        served = serve.get_app_handle(APP_NAME).info.remote().result(timeout_s=60)["version"]
        echo(f"v{trained.get('version')} is not the champion: the service keeps v{served}")
        return {"served_version": served, "deployed": False}
    deadline = time.monotonic() + timeout_s
    while True:
        served = serve.get_app_handle(APP_NAME).info.remote().result(timeout_s=60)["version"]
        if served == trained["version"]:
            echo(f"the model service serves v{served}")
            return {"served_version": served, "deployed": False}
        if time.monotonic() > deadline:
            raise PlatformError(f"the model service still serves v{served} {timeout_s:.0f}s after "
                                f"v{trained['version']} became champion: see its replica logs")
        time.sleep(2.0)


def drift(settings: Settings, spec: PlatformSpec, echo: Echo = _print) -> dict[str, Any]:
    from batch.drift import detect_drift

    report = detect_drift(settings, spec)
    echo(f"drift: {report.reason} ({report.current_rows} events scored in the window, plots in "
         f"{report.plots_dir})")
    return report.summary()


def maintenance(settings: Settings, spec: PlatformSpec, echo: Echo = _print) -> list[dict[str, Any]]:
    from lakehouse.maintenance import maintain

    return [asdict(u) for u in maintain(Lakehouse(settings.delta_uri), spec,
                                        retention_hours=settings.delta_vacuum_retention_hours,
                                        allow_unsafe_retention=settings.delta_vacuum_allow_unsafe_retention,
                                        echo=echo)]
