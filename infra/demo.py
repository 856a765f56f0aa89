"""`lambdalake demo`: the whole Lambda architecture, end to end, on the running platform.

1. a realistic stream (transactions and their later chargeback labels) into Kafka;
2. `lambdalake_batch` and `lambdalake_train` triggered through Airflow's API and awaited;
   training rolls the champion out to Ray Serve;
3. the speed layer and the HTTP API started as managed processes (`lambdalake up --apps`);
4. more events streamed while they run;
5. the proof: a merged-view SQL query, a /v1/predict call, the time an event takes to be
   visible in the merged view, the exact-merge check against the Kafka topic itself, and the
   model's metrics and plots.

It prints a readable summary and one JSON line prefixed `DEMO_SUMMARY `, and leaves the
platform running (`lambdalake down` stops it).
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from infra.airflow import AirflowClient, password_location
from infra.platform import Platform
from lakehouse.config import Settings
from lakehouse.errors import DemoError
from lakehouse.generator import GeneratorOptions, generate, produce
from lakehouse.secret_files import read_secret
from lakehouse.spec import PlatformSpec, format_timestamp_ms
from lakehouse.streams import ensure_topics, kafka_client_config, producer
from lakehouse.tables import Lakehouse
from serving.verify import check_exact_merge

Echo = Callable[[str], None]


def _api_key(settings: Settings) -> str:
    configured = settings.api_keys.get_secret_value()
    entries = (configured.split(",") if configured
               else read_secret(settings.api_keys_path).decode().splitlines())
    return next(e.strip().split(":")[1] for e in entries if e.strip() and not e.startswith("#"))


def _topic_counts(settings: Settings, spec: PlatformSpec) -> dict[str, int]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(**kafka_client_config(settings))
    out = {}
    for topic in spec.topics:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        out[topic] = sum(consumer.end_offsets(partitions).values()) if partitions else 0
    consumer.close()
    return out


def _table_rows(path: str) -> int:
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(path):
        return 0
    return sum(int(a) for a in DeltaTable(path).get_add_actions(flatten=True).column("num_records").to_pylist()
               if a is not None)


def run_demo(settings: Settings, spec: PlatformSpec, *, events: int, stream: int, rate: float,
             echo: Echo) -> dict[str, Any]:
    started = time.monotonic()
    timings: dict[str, float] = {}
    seed = int(time.time()) % 1_000_000  # fresh event ids on every run
    ensure_topics(settings, spec.topics, partitions=settings.kafka_partitions)

    echo(f"1/5 generating {events:,} transactions (seed {seed}) with their labels into Kafka")
    phase = time.monotonic()
    kafka = producer(settings)
    generated = produce(generate(GeneratorOptions(events=events, seed=seed)), producer=kafka,
                        progress=True, total_events=events).messages
    kafka.close()
    timings["generate_s"] = round(time.monotonic() - phase, 1)
    at_batch = _topic_counts(settings, spec)  # what the batch DAG's ingest finds

    echo("2/5 batch layer and training through Airflow (lambdalake_batch, lambdalake_train)")
    airflow = AirflowClient(settings)
    phase = time.monotonic()
    batch = airflow.run_dag("lambdalake_batch", echo=echo)
    if batch["state"] != "success":
        raise DemoError(f"lambdalake_batch failed: {batch['tasks']}; see the Airflow UI")
    timings["batch_dag_s"] = round(time.monotonic() - phase, 1)
    phase = time.monotonic()
    train = airflow.run_dag("lambdalake_train", echo=echo)
    if train["state"] != "success":
        raise DemoError(f"lambdalake_train failed: {train['tasks']}; see the Airflow UI")
    timings["train_dag_s"] = round(time.monotonic() - phase, 1)
    trained: dict[str, Any] = airflow.xcom("lambdalake_train", train["run_id"], "train")  # type: ignore[assignment]
    views: dict[str, Any] = airflow.xcom("lambdalake_batch", batch["run_id"], "views")  # type: ignore[assignment]

    echo("3/5 starting the speed layer and the HTTP API")
    phase = time.monotonic()
    Platform(settings).start_apps(echo=echo)
    timings["apps_start_s"] = round(time.monotonic() - phase, 1)
    url = f"http://{settings.api_host}:{settings.api_port}"
    client = httpx.Client(base_url=url, headers={"X-API-Key": _api_key(settings)}, timeout=60)

    echo(f"4/5 streaming {stream:,} more transactions at {rate:g}/s while the speed layer scores")
    kafka = producer(settings)
    streamed = produce(generate(GeneratorOptions(events=stream, seed=seed + 1)), producer=kafka,
                       rate=rate).messages
    kafka.close()
    ends = _topic_counts(settings, spec)

    api_log = settings.logs_dir / "api.log"

    def caught_up() -> bool:
        coverage: dict[str, int] = _ask(
            client, "reading the serving snapshot's coverage", api_log, "POST", "/v1/sql",
            lambda answer: json.loads(answer["rows"][0]["coverage"]),
            json={"query": "SELECT coverage FROM serving.snapshot"})
        return sum(o + 1 for o in coverage.values()) >= ends[spec.events.topic]

    deadline = time.monotonic() + 600
    while not caught_up():
        if time.monotonic() > deadline:
            raise DemoError("the speed layer did not catch up within 10 minutes: "
                            f"see {settings.logs_dir / 'speed.log'}")
        time.sleep(1)

    echo("5/5 the proof: SQL, /predict, freshness, exact merge")
    top = _ask(client, "querying the top users", api_log, "POST", "/v1/sql",
               lambda answer: {"rows": answer["rows"], "user": answer["rows"][0]["user_id"]},
               json={"query": "SELECT user_id, count, mean_amount, std_amount "
                              "FROM merged.user_all ORDER BY count DESC LIMIT 5"})
    user = top["user"]
    merchant = _ask(client, "querying the top merchant", api_log, "POST", "/v1/sql",
                    lambda answer: answer["rows"][0]["merchant_id"],
                    json={"query": "SELECT merchant_id FROM merged.merchant_all "
                                   "ORDER BY count DESC LIMIT 1"})
    probe = {"event_id": f"demo-{uuid.uuid4().hex[:8]}", "user_id": user, "merchant_id": merchant,
             "merchant_category": "gift_cards", "amount": 899.99, "currency": "EUR", "country": "BR",
             "channel": "online", "event_time": format_timestamp_ms(int(time.time() * 1000))}
    latencies, prediction = [], {}
    for i in range(30):
        begun = time.perf_counter()
        prediction = _ask(client, "scoring the probe (/v1/predict)", api_log, "POST", "/v1/predict",
                          json={**probe, "amount": 100 + i})
        latencies.append((time.perf_counter() - begun) * 1000)
    def user_count() -> int:
        count: int = _ask(client, f"reading the features of user {user}", api_log, "GET",
                          f"/v1/entities/user_id/{user}/features",
                          lambda answer: answer["views"]["user_all"]["count"])
        return count

    before = user_count()
    kafka = producer(settings)
    sent = time.perf_counter()
    kafka.send(spec.events.topic, key=user.encode(), value=json.dumps(probe).encode())
    kafka.flush()
    kafka.close()
    while user_count() <= before:
        if time.perf_counter() - sent > 120:
            raise DemoError("the probe event did not reach the merged view within 120 s")
        time.sleep(0.02)
    freshness_ms = (time.perf_counter() - sent) * 1000
    exact = check_exact_merge(settings, spec, echo=echo)

    lakehouse = Lakehouse(settings.delta_uri)
    topics = _topic_counts(settings, spec)
    counts = {
        "generated_messages": generated + streamed,
        "kafka_events": topics[spec.events.topic], "kafka_labels": topics[spec.labels.topic],
        "kafka_events_at_batch": at_batch[spec.events.topic],
        # the records the batch run covers: the speed layer resumes above them
        "kafka_events_in_batch_run": sum(int(o) + 1 for o in views["boundary"].values()),
        "kafka_dlq": topics[spec.topics[2]],
        "bronze_events": _table_rows(lakehouse.bronze(spec.events.topic)),
        "silver_events": _table_rows(lakehouse.silver(spec.events.name)),
        "quarantined_events": _table_rows(lakehouse.quarantine(spec.events.name)),
        "gold_states": sum(views["row_counts"].get(v.name, 0) for v in spec.views),
        "training_rows": trained["training_set"]["rows"],
        "scored_events": _table_rows(lakehouse.scored_events),
        "merged_users": _ask(client, "counting the merged users", api_log, "POST", "/v1/sql",
                             lambda answer: answer["rows"][0]["n"],
                             json={"query": "SELECT count(*) AS n FROM merged.user_all"}),
    }
    summary = {
        "seed": seed,
        "counts": counts,
        "exact_merge": {"passed": exact["ok"], "valid_events": exact["valid_events"],
                        "states": sum(v["states"] for v in exact["views"].values()),
                        "mismatches": sum(v["mismatches"] for v in exact["views"].values())},
        "model": {"name": trained["model_name"], "version": trained["version"], "alias": trained["alias"],
                  "roc_auc": round(trained["metrics"]["roc_auc"], 4),
                  "pr_auc": round(trained["metrics"]["pr_auc"], 4),
                  "plots": f"{settings.models_dir / trained['mlflow_run_id'] / 'plots'}"},
        "predict": {"score": prediction.get("score"), "model_version": prediction.get("model_version"),
                    "p50_ms": round(statistics.median(latencies), 2),
                    "max_ms": round(max(latencies), 2)},
        "freshness_ms": round(freshness_ms, 1),
        "batch_run_id": views["batch_run_id"],
        "timings_s": {**timings, "total_s": round(time.monotonic() - started, 1)},
        "top_users": top["rows"],
    }
    client.close()
    return summary


def _ask(client: httpx.Client, what: str, log: Path, method: str, path: str,
         pick: Callable[[Any], Any] = lambda answer: answer, **kwargs: Any) -> Any:
    """What `pick` takes from the API's JSON answer to one request; DemoError naming `what`
    if the API cannot be reached or its answer lacks what `pick` wants (an error answer)."""
    try:
        response = client.request(method, path, **kwargs)
    except httpx.TransportError as exc:  # connect, timeout, protocol errors
        raise DemoError(f"{what}: the HTTP API at {client.base_url} did not answer "
                        f"({type(exc).__name__}: {exc}); see {log}") from exc
    try:
        return pick(response.json())
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise DemoError(f"{what}: the HTTP API answered {response.status_code} "
                        f"{response.text[:300]!r}; see {log}") from exc


def print_summary(summary: dict[str, Any], settings: Settings, out: Callable[[str], None]) -> None:
    c, m, p = summary["counts"], summary["model"], summary["predict"]
    exact = summary["exact_merge"]
    lines = [
        "",
        "lambdalake demo — what happened",
        f"  Kafka            {c['kafka_events']:,} transactions, {c['kafka_labels']:,} labels, "
        f"{c['kafka_dlq']:,} to the DLQ",
        f"  batch (Airflow)  bronze {c['bronze_events']:,} → silver {c['silver_events']:,} + quarantine "
        f"{c['quarantined_events']:,}; {c['gold_states']:,} gold states (run {summary['batch_run_id']})",
        f"  training         {c['training_rows']:,} labelled rows → {m['name']} v{m['version']} ({m['alias']}), "
        f"ROC AUC {m['roc_auc']}, PR AUC {m['pr_auc']}; plots in {m['plots']}",
        f"  speed layer      {c['scored_events']:,} events scored exactly once, above the "
        f"{c['kafka_events_in_batch_run']:,} records the batch run covers",
        f"  merged views     {c['merged_users']:,} users; exact merge "
        f"{'PASSED' if exact['passed'] else 'FAILED'} ({exact['states']:,} states, "
        f"{exact['mismatches']} mismatches, {exact['valid_events']:,} valid events recomputed from Kafka)",
        f"  /v1/predict      score {p['score']:.4f} by v{p['model_version']}, p50 {p['p50_ms']} ms",
        f"  freshness        an event was in the merged view {summary['freshness_ms']} ms after it was sent",
        f"  time             {summary['timings_s']}",
        "",
        "The platform keeps running ('lambdalake down' stops it):",
        f"  Airflow UI   http://127.0.0.1:{settings.airflow_port}  (login {settings.airflow_user}, "
        f"password {password_location(settings)})",
        f"  MLflow       http://127.0.0.1:{settings.mlflow_port}",
        f"  HTTP API     http://{settings.api_host}:{settings.api_port}/docs  (X-API-Key from "
        f"{settings.api_keys_path})",
        f"  Ray Serve    http://127.0.0.1:{settings.serve_http_port}/model",
        f"  metrics      http://127.0.0.1:{settings.speed_metrics_port}/metrics (speed layer), "
        f"http://{settings.api_host}:{settings.api_port}/metrics (API)",
        "  SQL          .venv/bin/lambdalake sql \"SELECT * FROM merged.user_all LIMIT 5\"",
        "",
        "DEMO_SUMMARY " + json.dumps({k: v for k, v in summary.items() if k != "top_users"}),
    ]
    for line in lines:
        out(line)
