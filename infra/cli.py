"""The `lambdalake` command line: one entry point for every layer, above them all.

A thin face: settings are read once here and handed to what each command calls; every
`lambdalake batch ...` command runs `batch.jobs`, as the Airflow DAGs do. First-party modules
are imported inside the commands that use them, so `lambdalake --help` stays fast.

Errors lambdalake raises on purpose (PlatformError, `lakehouse.errors`) print as one line,
without a traceback, and exit non-zero: 2 for bad configuration or arguments, 1 for
everything else; `status` exits 3 when a service is not healthy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lakehouse.config import Settings, load_settings
from lakehouse.errors import ConfigError, PlatformError
from lakehouse.registry import CHALLENGER, CHAMPION

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from batch.jobs import TrainResult
    from infra.service import Health
    from lakehouse.online.base import OnlineStore
    from lakehouse.tables import Lakehouse
    from speed.model_service import ServiceArgs

app = typer.Typer(
    name="lambdalake",
    help="A Lambda-architecture ML data platform: batch (Spark + Delta), speed (Kafka + Ray "
    "Serve) and serving (exact merged views, SQL, /predict), orchestrated by Airflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)


class _State:
    settings: Settings | None = None


def settings() -> Settings:
    if _State.settings is None:
        _State.settings = load_settings()
    return _State.settings


def _echo(line: str) -> None:
    err.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {line}", highlight=False)


@app.command()
def up(
    apps: Annotated[bool, typer.Option("--apps", help="then start the speed layer and the API "
                                       "(they need a champion model on Ray Serve)")] = False,
) -> None:
    """Start the local platform (Kafka, Redis, MLflow, Ray + Serve, Airflow). Idempotent."""
    from infra.platform import Platform

    # a SIGTERM mid-start unwinds like Ctrl-C, so `up` stops what it had started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    healths = Platform(settings()).up(apps=apps, echo=_echo)
    _print_status(healths)
    _echo(f"platform up in {time.monotonic() - started:.1f}s")


@app.command()
def down() -> None:
    """Stop every service `up` started and check no port is left listening."""
    from infra.platform import Platform

    Platform(settings()).down(echo=_echo)
    _echo("platform down")


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per service")] = False,
) -> None:
    """Health, pids and URL of each service. Exit code 3 if any is not healthy."""
    from infra.platform import Platform

    healths = Platform(settings()).status()
    if as_json:
        for health in healths:
            print(json.dumps(health.__dict__))
    else:
        _print_status(healths)
    if not all(h.healthy for h in healths):
        raise typer.Exit(3)


def _print_status(healths: list[Health]) -> None:
    table = Table("service", "state", "pids", "url")
    for health in healths:
        colour = "green" if health.healthy else "red"
        table.add_row(health.service, f"[{colour}]{health.detail}[/{colour}]",
                      " ".join(map(str, health.pids)), health.url)
    out.print(table)
    for health in healths:  # a supervised app that exited (an AppHealth): what it said last
        last_exit = getattr(health, "last_exit", "")
        if last_exit and not health.healthy:
            out.print(f"{health.service} last exited with {last_exit}; its last error:",
                      style="red", highlight=False, markup=False)
            out.print(getattr(health, "last_error", "") or "(nothing on stderr)", highlight=False,
                      markup=False)
    from infra.airflow import password_location

    out.print(f"Airflow UI login: {settings().airflow_user}, password "
              f"{password_location(settings())}", highlight=False, markup=False)


@app.command()
def generate(
    events: Annotated[int, typer.Option("--events", "-n", min=1, help="transactions to send")],
    rate: Annotated[float, typer.Option(help="messages per second; 0 = as fast as possible", min=0)] = 0,
    seed: Annotated[int | None, typer.Option(
        min=0, help="same seed and options, same messages (default: GeneratorOptions.seed)")] = None,
    malformed: Annotated[float | None, typer.Option(
        help="fraction of malformed messages (default: GeneratorOptions.malformed_fraction)")] = None,
    duplicates: Annotated[float | None, typer.Option(
        help="fraction of re-sent duplicates (default: GeneratorOptions.duplicate_fraction)")] = None,
    late: Annotated[float | None, typer.Option(
        help="fraction of late (out-of-order) events (default: GeneratorOptions.late_fraction)")] = None,
    truth: Annotated[Path | None, typer.Option(
        help="Parquet file for the ground truth; default <state_dir>/generated/truth-seed<S>.parquet"
    )] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Stream the fraud example into Kafka: transactions on `events`, labels on `labels`."""
    from lakehouse.fraud import FRAUD_SPEC
    from lakehouse.generator import GeneratorOptions, generate_and_produce
    from lakehouse.streams import ensure_topics, producer

    given: dict[str, Any] = {"seed": seed, "malformed_fraction": malformed,
                             "duplicate_fraction": duplicates, "late_fraction": late}
    options = GeneratorOptions(events=events,
                               **{name: value for name, value in given.items() if value is not None})
    config = settings()
    truth_path = truth or config.state_path / "generated" / f"truth-seed{options.seed}.parquet"
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    ensure_topics(config, FRAUD_SPEC.topics, partitions=config.kafka_partitions)
    kafka = producer(config)
    try:
        summary = generate_and_produce(options, producer=kafka, rate=rate or None,
                                       progress=progress, truth_path=truth_path)
    finally:
        kafka.close()
    print(json.dumps({"messages": summary.messages, "by_topic": summary.by_topic,
                      "by_kind": summary.by_kind, "elapsed_s": round(summary.elapsed_s, 2),
                      "messages_per_s": round(summary.rate, 1), "truth": str(truth_path)}))


batch_app = typer.Typer(help="The batch layer: Kafka → bronze → silver/quarantine → views → model.",
                        no_args_is_help=True)
app.add_typer(batch_app, name="batch")


def _spark() -> SparkSession:
    from lakehouse.spark import spark_session

    _echo(f"starting Spark ({settings().spark_master})")
    return spark_session(settings())


def _lakehouse() -> Lakehouse:
    from lakehouse.tables import Lakehouse

    return Lakehouse(settings().delta_uri)


def _store(config: Settings) -> OnlineStore:
    """The speed group's online store, over the settings' lakehouse."""
    from lakehouse.fraud import FRAUD_SPEC
    from lakehouse.online import open_store

    return open_store(config, FRAUD_SPEC)


@batch_app.command("ingest")
def batch_ingest(
    topics: Annotated[list[str] | None, typer.Option(
        "--topic", help="topic(s); default: the spec's events and labels")] = None,
    max_offsets_per_trigger: Annotated[int | None, typer.Option(min=1, help="records per micro-batch")] = None,
) -> None:
    """Append every new Kafka record to the bronze Delta tables, exactly once."""
    from batch import jobs
    from lakehouse.fraud import FRAUD_SPEC

    added = jobs.run_ingest(settings(), FRAUD_SPEC, spark=_spark(), topics=topics,
                            max_offsets_per_trigger=max_offsets_per_trigger, echo=_echo)
    print(json.dumps({"ingested": [a.__dict__ for a in added]}))


@batch_app.command("validate")
def batch_validate() -> None:
    """Route new bronze records to silver (valid, deduplicated) or quarantine (with reasons)."""
    from batch import jobs
    from lakehouse.fraud import FRAUD_SPEC

    summaries = jobs.run_validate(settings(), FRAUD_SPEC, spark=_spark(), echo=_echo)
    print(json.dumps({"validated": [{**s.__dict__, "failure_rate": round(s.failure_rate, 6)}
                                    for s in summaries]}))


@batch_app.command("accept")
def batch_accept(
    slice_id: Annotated[str, typer.Argument(help="the slice the validate error names, e.g. transaction/3-1a2b3c4d5e")],
    note: Annotated[str, typer.Option(help="why it is accepted (kept with the acceptance)")] = "",
) -> None:
    """Accept a validation slice above LAMBDALAKE_BATCH_MAX_FAILURE_RATE: the next validate
    run writes its valid records to silver and the rest to quarantine, as usual."""
    from batch import jobs

    print(json.dumps(jobs.accept(settings(), slice_id, note=note, echo=_echo)))


@batch_app.command("views")
def batch_views() -> None:
    """Cut the online store, recompute every feature view up to the cut into gold (catching
    silver up to it first where needed), then publish the run."""
    from batch import jobs
    from lakehouse.fraud import FRAUD_SPEC

    run = jobs.run_views(settings(), FRAUD_SPEC, spark=_spark(), echo=_echo)
    print(json.dumps({"batch_run": {**run.__dict__, "finished_at": run.finished_at.isoformat()}}))


def _cutoff_ms(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"expected an ISO-8601 time such as 2026-01-03T00:00:00Z, "
                                 f"got {text!r}", param_hint="--label-cutoff") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


_LABEL_CUTOFF = typer.Option(help="count only labels known at this time (ISO-8601, UTC if no "
                                  "offset); default: every label ingested")
_EPOCHS = typer.Option(min=1, help="training epochs (default: LAMBDALAKE_TRAIN_EPOCHS)")
_MAX_TRAIN_ROWS = typer.Option(min=1, help="train on a random sample of this many rows")


def _train(spark: SparkSession, label_cutoff_ms: int | None, epochs: int | None,
           max_train_rows: int | None) -> TrainResult:
    from batch import jobs
    from lakehouse.fraud import FRAUD_SPEC

    # the training processes' progress and MLflow's run links go with the rest of the
    # progress, to stderr: stdout carries only the JSON summary
    with contextlib.redirect_stdout(sys.stderr):
        return jobs.run_train(settings(), FRAUD_SPEC, spark=spark, label_cutoff_ms=label_cutoff_ms,
                              epochs=epochs, max_train_rows=max_train_rows, echo=_echo)


@batch_app.command("train")
def batch_train(
    label_cutoff: Annotated[str | None, _LABEL_CUTOFF] = None,
    epochs: Annotated[int | None, _EPOCHS] = None,
    max_train_rows: Annotated[int | None, _MAX_TRAIN_ROWS] = None,
) -> None:
    """Point-in-time training set of the latest batch run → torch model (TorchDistributor) →
    holdout evaluation → signed bundle → MLflow version, champion or challenger."""
    cutoff_ms = _cutoff_ms(label_cutoff)  # a bad value fails before Spark starts
    result = _train(_spark(), cutoff_ms, epochs, max_train_rows)
    print(json.dumps(result.summary()))


@batch_app.command("run")
def batch_run(
    max_offsets_per_trigger: Annotated[int | None, typer.Option(min=1, help="records per ingest micro-batch")] = None,
    label_cutoff: Annotated[str | None, _LABEL_CUTOFF] = None,
    epochs: Annotated[int | None, _EPOCHS] = None,
) -> None:
    """ingest → validate → views (→ publish) → train, in order, in one Spark session."""
    from batch import jobs
    from lakehouse.fraud import FRAUD_SPEC

    config = settings()
    cutoff_ms = _cutoff_ms(label_cutoff)  # a bad value fails before Spark starts
    spark = _spark()
    added = jobs.run_ingest(config, FRAUD_SPEC, spark=spark,
                            max_offsets_per_trigger=max_offsets_per_trigger, echo=_echo)
    validated = jobs.run_validate(config, FRAUD_SPEC, spark=spark, echo=_echo)
    run = jobs.run_views(config, FRAUD_SPEC, spark=spark, echo=_echo)
    trained = _train(spark, cutoff_ms, epochs, None)
    print(json.dumps({
        "ingested": {a.topic: a.rows for a in added},
        "validated": {v.schema: {"silver": v.silver_rows, "quarantined": v.quarantined,
                                 "duplicates": v.duplicates} for v in validated},
        "batch_run": run.run_id, "boundary": run.boundary, "cut_epochs": run.cut_epochs,
        "view_rows": run.row_counts,
        "model": {"name": trained.model_name, "version": trained.version, "alias": trained.alias,
                  "reason": trained.reason, "mlflow_run_id": trained.mlflow_run_id},
        "metrics": trained.metrics,
        "training_set": trained.training_set,
    }))


model_app = typer.Typer(help="The model service: the champion model on Ray Serve.",
                        no_args_is_help=True)
app.add_typer(model_app, name="model")


AliasOption = Annotated[str, typer.Option(
    help="registry alias to serve: champion (app `model`) or challenger (app `model-challenger`)")]


def _service_args(alias: str) -> ServiceArgs:
    from speed.model_service import ServiceArgs

    if alias not in (CHAMPION, CHALLENGER):
        raise typer.BadParameter(f"--alias must be {CHAMPION} or {CHALLENGER}, got {alias!r}")
    return ServiceArgs.from_settings(settings(), alias=alias)


@model_app.command("serve")
def model_serve(alias: AliasOption = CHAMPION) -> None:
    """Deploy (or update) the model service on the platform's Ray Serve and wait until it
    answers; prints the version it serves."""
    import os

    from lakehouse.serve import app_name, ray_local_env
    from speed.model_service import serve_on_ray

    config = settings()
    os.environ.update(ray_local_env(config))  # before Ray is imported

    service = _service_args(alias)
    _echo(f"deploying the model service ({alias}) on Ray at {config.ray_address}")
    info = serve_on_ray(config.ray_address, service)
    print(json.dumps({**info, "url": f"http://127.0.0.1:{config.serve_http_port}/{app_name(alias)}"}))


@model_app.command("config")
def model_config(alias: AliasOption = CHAMPION) -> None:
    """Print a Ray Serve config file for the model service (`serve deploy FILE`)."""
    from speed.model_service import serve_config

    print(serve_config(_service_args(alias)), end="")


speed_app = typer.Typer(help="The speed layer: Kafka → features → Ray Serve → Delta, exactly once.",
                        no_args_is_help=True)
app.add_typer(speed_app, name="speed")


@speed_app.command("run")
def speed_run(
    group: Annotated[str | None, typer.Option(
        help="Kafka consumer group; members share the partitions [default: LAMBDALAKE_SPEED_GROUP]")] = None,
    max_batch: Annotated[int | None, typer.Option(
        min=1, help="records per micro-batch at most (default: SpeedOptions.max_batch)")] = None,
    max_wait_ms: Annotated[int | None, typer.Option(
        min=1, help="longest wait for a micro-batch to fill (default: SpeedOptions.max_wait_ms)")] = None,
    max_events: Annotated[int | None, typer.Option(min=1, help="stop after this many records")] = None,
    idle_exit: Annotated[float | None, typer.Option(min=0.1, help="stop after this many idle seconds")] = None,
    metrics_port: Annotated[int, typer.Option(
        min=0, max=65535, help="serve Prometheus metrics on METRICS_HOST:PORT (0: off)")] = 0,
    metrics_host: Annotated[str, typer.Option(
        help="bind address of the metrics endpoint (0.0.0.0 in a pod, for the scraper)")] = "127.0.0.1",
    topic: Annotated[str | None, typer.Option(help="events topic (default: the spec's); the DLQ is TOPIC.dlq")] = None,
    on_missing_offsets: Annotated[str | None, typer.Option(
        help="resuming below the oldest offset Kafka holds: fail (an error with the numbers) or "
             "skip (start at the oldest; logged and counted as lost) "
             "(default: SpeedOptions.on_missing_offsets)")] = None,
) -> None:
    """Score every event of the events topic through the model service, exactly once,
    until SIGTERM/SIGINT (the current micro-batch completes first)."""
    if on_missing_offsets is not None and on_missing_offsets not in ("fail", "skip"):
        raise typer.BadParameter(f"expected fail or skip, got {on_missing_offsets!r}",
                                 param_hint="--on-missing-offsets")
    import threading

    from lakehouse.fraud import FRAUD_SPEC
    from lakehouse.logs import json_logging
    from lakehouse.serve import connect, serve_scorer
    from speed.consumer import SpeedLayer, SpeedOptions

    config = settings()
    json_logging(config.log_level)
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=metrics_host)
    connect(config, quiet=True)  # the local platform's Ray environment, then ray.init
    # after ray.init, which installs a SIGTERM handler that exits at once, mid-batch
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    spec = FRAUD_SPEC
    if topic:
        spec = dataclasses.replace(spec, events=dataclasses.replace(spec.events, topic=topic),
                                   dlq_topic=f"{topic}.dlq")
    given = {"group_id": group or None, "max_batch": max_batch, "max_wait_ms": max_wait_ms,
             "on_missing_offsets": on_missing_offsets}
    options = SpeedOptions.from_settings(
        config, **{name: value for name, value in given.items() if value is not None})
    _echo(f"speed layer: group {options.group_id}, topic {spec.events.topic}")
    # the scoring loop hands the GIL to its helper threads (Ray's router, which carries the
    # micro-batch to the model, the outbox flusher) within 1 ms, not CPython's 5 ms: each
    # hop of a scoring call waited up to a switch interval while the loop merged blocks
    sys.setswitchinterval(0.001)
    counts = SpeedLayer(config, spec, serve_scorer(), options=options).run(
        stop, max_events=max_events, idle_exit_s=idle_exit)
    print(json.dumps(counts))


@speed_app.command("rebuild")
def speed_rebuild(
    group: Annotated[str | None, typer.Option(
        help="the consumer group whose store to rebuild [default: LAMBDALAKE_SPEED_GROUP]")] = None,
    topic: Annotated[str | None, typer.Option(help="events topic (default: the spec's)")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="wipe the group's store without asking")] = False,
) -> None:
    """Wipe the speed group's online store and re-derive it from the lakehouse (the newest
    published run's cut, the scored events above it, silver's identities). Stop the speed
    layer first (`lambdalake down --apps`); it resumes where the rebuilt store stands."""
    from lakehouse.fraud import FRAUD_SPEC
    from lakehouse.online import open_store
    from lakehouse.streams import topic_partitions
    from speed.rebuild import rebuild_store

    config = settings()
    spec = FRAUD_SPEC
    if topic:
        spec = dataclasses.replace(spec, events=dataclasses.replace(spec.events, topic=topic),
                                   dlq_topic=f"{topic}.dlq")
    name = group or config.speed_group
    if not yes:
        typer.confirm(f"wipe and rebuild the online store of group {name!r} on {spec.events.topic!r}?",
                      abort=True)
    store = open_store(config, spec, group=name)
    partitions = max(config.kafka_partitions, topic_partitions(config, spec.events.topic))
    rebuilt = rebuild_store(store, spec, _lakehouse(), partitions=partitions, echo=_echo)
    print(json.dumps(dataclasses.asdict(rebuilt)))


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="one SELECT over merged.*, gold.*, speed.*, bronze.*, ...")],
    as_json: Annotated[bool, typer.Option("--json", help="the rows as JSON lines")] = False,
    engine: Annotated[str, typer.Option(help="duckdb (embedded) or spark (Spark SQL)")] = "duckdb",
    max_rows: Annotated[int | None, typer.Option(
        min=1, help="at most this many rows [default: LAMBDALAKE_SQL_ROW_CAP]")] = None,
) -> None:
    """Query the merged views (batch ⊕ speed, exact) and the raw tables, read-only."""
    from lakehouse.errors import SqlError

    if engine not in ("duckdb", "spark"):
        raise typer.BadParameter(f"--engine must be duckdb or spark, got {engine!r}")
    config = settings()
    cap = min(max_rows or config.sql_row_cap, config.sql_row_cap)
    try:
        table, truncated, snapshot = _run_sql(engine, query, cap)
    except SqlError as exc:
        _print_error("query refused", exc)
        raise typer.Exit(2) from None
    from serving.api import json_rows

    rows = json_rows(table)
    if as_json:
        for row in rows:
            print(json.dumps(row))
    else:
        grid = Table(*table.column_names, show_lines=False)
        for row in rows:
            grid.add_row(*["" if v is None else str(v) for v in row.values()])
        out.print(grid)
    _echo(f"{len(rows)} rows{' (truncated: raise --max-rows)' if truncated else ''}; "
          f"batch run {snapshot.run_id}, {snapshot.increments} speed events above its boundary")


def _run_sql(engine: str, query: str, cap: int):  # type: ignore[no-untyped-def]
    from lakehouse.fraud import FRAUD_SPEC
    from serving.duck import DuckEngine

    config = settings()
    if engine == "spark":
        from serving.spark_sql import SparkEngine

        spark_engine = SparkEngine(_spark(), FRAUD_SPEC, _lakehouse(), store=_store(config),
                                   partitions=config.kafka_partitions)
        snapshot = spark_engine.register()
        table, truncated = spark_engine.query(query, row_cap=cap)
    else:
        duck = DuckEngine(FRAUD_SPEC, _lakehouse(), store=_store(config),
                          partitions=config.kafka_partitions, memory_limit=config.duckdb_memory_limit)
        snapshot = duck.refresh()
        result = duck.query(query, row_cap=cap, timeout_s=config.sql_timeout_s)
        table, truncated = result.table, result.truncated
    return table, truncated, snapshot


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind host [default: LAMBDALAKE_API_HOST]")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="port [default: LAMBDALAKE_API_PORT]")] = None,
) -> None:
    """Run the HTTP API (/v1/predict, /v1/sql, features, /metrics, /docs) until SIGTERM."""
    from lakehouse.fraud import FRAUD_SPEC
    from serving.server import serve_api

    config = settings()
    host, port = host or config.api_host, port or config.api_port
    _echo(f"API on http://{host}:{port} (docs at /docs); keys in {config.api_keys_path}")
    serve_api(config, FRAUD_SPEC, host=host, port=port)


@app.command()
def verify() -> None:
    """Recompute every merged view from the Kafka topic itself and compare (exact merge)."""
    from lakehouse.fraud import FRAUD_SPEC
    from serving.verify import check_exact_merge

    report = check_exact_merge(settings(), FRAUD_SPEC, echo=_echo)
    print(json.dumps(report))
    if not report["ok"]:
        raise typer.Exit(1)


@app.command()
def demo(
    events: Annotated[int, typer.Option(min=1000, help="transactions generated before the batch run")] = 200_000,
    stream: Annotated[int, typer.Option(min=1, help="transactions streamed while the speed layer runs")] = 5_000,
    rate: Annotated[float, typer.Option(min=1, help="messages per second of that stream")] = 1_000.0,
) -> None:
    """The whole architecture end to end on the running platform (`lambdalake up` first):
    stream → Airflow batch and training → speed layer and API → SQL, /predict, exact merge."""
    from infra.demo import print_summary, run_demo
    from lakehouse.fraud import FRAUD_SPEC

    config = settings()
    summary = run_demo(config, FRAUD_SPEC, events=events, stream=stream, rate=rate, echo=_echo)
    print_summary(summary, config, lambda line: print(line, flush=True))
    if not summary["exact_merge"]["passed"]:
        raise typer.Exit(1)


@app.command()
def jars(
    s3: Annotated[bool, typer.Option(
        "--s3", help="also Hadoop's S3A filesystem and the AWS SDK (~700 MB), for "
                     "LAMBDALAKE_DELTA_ROOT=s3a://…")] = False,
) -> None:
    """Fetch the Kafka broker and Spark extra jars with Maven (once per pom change)."""
    from infra.jvm import ensure_jars

    target = settings().jars_dir
    ensure_jars(target, quiet=False, s3=s3)
    _echo(f"jars in {target}")


@app.command("k8s-check")
def k8s_check(
    directory: Annotated[Path | None, typer.Argument(help="folder of *.yaml manifests [default: infra/k8s]")] = None,
) -> None:
    """Validate Kubernetes manifests offline: core kinds against the Kubernetes API's schemas,
    Strimzi/Spark operator/KubeRay resources against their CRDs (fetched once), Airflow chart
    values against Airflow's config, and every LAMBDALAKE_* value as lambdalake reads it."""
    from infra.k8s import KUBERNETES_VERSION, MANIFESTS_DIR, check_manifests

    directory = directory or MANIFESTS_DIR
    if not directory.is_dir():
        raise typer.BadParameter(f"{directory} is not a folder", param_hint="DIRECTORY")
    problems = check_manifests(directory, crds_dir=settings().state_path / "k8s-crds")
    for problem in problems:
        err.print(str(problem), highlight=False, markup=False)
    files = sorted(p.name for p in directory.glob("*.yaml"))
    print(json.dumps({"directory": str(directory), "files": files, "problems": len(problems),
                      "kubernetes": KUBERNETES_VERSION}))
    if problems:
        raise typer.Exit(1)


@app.command()
def config() -> None:
    """Print the effective settings (secrets hidden)."""
    out.print_json(settings().model_dump_json())


def one_line(error: BaseException) -> str:
    """An error's message on one line: its lines (a log tail, say) joined with " | "."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " | ".join(lines) or type(error).__name__


def _print_error(prefix: str, error: BaseException) -> None:
    # soft_wrap: one line whatever the terminal's width; escape: the message is not markup
    err.print(f"[red]{prefix}:[/red] {escape(one_line(error))}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point: typer/click handle usage errors (exit 2) and exit codes; lambdalake's
    own errors (every PlatformError) print as one line, without a traceback."""
    try:
        app(args=argv)
    except ConfigError as exc:
        _print_error("configuration error", exc)
        sys.exit(2)
    except PlatformError as exc:
        _print_error("error", exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
