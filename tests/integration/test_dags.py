"""The Airflow DAGs run to success with `dag.test()` against the real services (Kafka, Spark
+ Delta, MLflow, Ray Serve), and the drift DAG signals retraining on shifted data only.

`dag.test()` runs in a subprocess with its own AIRFLOW_HOME (a migrated SQLite DB), so it
never contends with the platform's scheduler for the platform's DB; the tasks see the test
platform's settings and a Delta root of their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from infra.airflow import DAGS_FOLDER, airflow_env
from lakehouse.config import Settings
from lakehouse.fraud import FRAUD_SPEC
from lakehouse.generator import GeneratorOptions, generate, produce
from lakehouse.streams import ensure_topics, producer
from lakehouse.tables import Lakehouse
from tests.integration.models import random_model

pytestmark = pytest.mark.integration

RUNNER = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
assert not bag.import_errors, bag.import_errors
run = bag.get_dag(sys.argv[2]).test()
states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
print("DAGRUN " + json.dumps({"state": str(run.state), "tasks": states}))
"""


@pytest.fixture(scope="module")
def home(platform: Settings, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An AIRFLOW_HOME for dag.test(), migrated once; the test platform's settings."""
    base = tmp_path_factory.mktemp("airflow-test-home")
    settings = platform.model_copy(update={"airflow_home": base})
    env = {**os.environ, **airflow_env(settings)}
    migrated = subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], env=env,
                              capture_output=True, text=True, timeout=300)
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    (base / "runner.py").write_text(RUNNER)
    return env


def run_dag(env: dict[str, str], dag_id: str, **settings: str) -> dict[str, Any]:
    runner = Path(env["AIRFLOW_HOME"]) / "runner.py"
    result = subprocess.run([sys.executable, str(runner), str(DAGS_FOLDER), dag_id],
                            env={**env, **settings}, capture_output=True, text=True, timeout=1200)
    lines = [line for line in result.stdout.splitlines() if line.startswith("DAGRUN ")]
    assert result.returncode == 0 and lines, (result.stdout[-3000:], result.stderr[-5000:])
    return json.loads(lines[-1].removeprefix("DAGRUN "))


@pytest.fixture(scope="module")
def lake(platform: Settings) -> dict[str, str]:
    """A Delta root and model name of this module's own; the spec's topics hold a stream."""
    ensure_topics(platform.kafka_bootstrap_servers, FRAUD_SPEC.topics, partitions=platform.kafka_partitions)
    kafka = producer(platform.kafka_bootstrap_servers)
    produce(generate(GeneratorOptions(events=6000, seed=61)), producer=kafka)
    kafka.close()
    return {"LAMBDALAKE_DELTA_ROOT": f"{platform.delta_uri}/dags-{uuid.uuid4().hex[:6]}",
            "LAMBDALAKE_MODEL_NAME": f"dags-{uuid.uuid4().hex[:6]}", "LAMBDALAKE_TRAIN_EPOCHS": "2"}


def test_batch_then_train_then_maintenance_run_to_success(home: dict[str, str], lake: dict[str, str],
                                                          ray_cluster: Settings) -> None:
    from deltalake import DeltaTable
    from ray import serve

    batch = run_dag(home, "lambdalake_batch", **lake)
    assert batch["state"] == "success", batch
    assert batch["tasks"] == {"ingest": "success", "validate": "success", "views": "success"}
    lakehouse = Lakehouse(lake["LAMBDALAKE_DELTA_ROOT"])
    assert DeltaTable(lakehouse.batch_runs).to_pyarrow_table().num_rows == 1

    try:
        train = run_dag(home, "lambdalake_train", **lake)
        assert train["state"] == "success", train
        assert set(train["tasks"].values()) == {"success"}
        served = serve.get_app_handle("model").info.remote().result(timeout_s=60)
        assert served["model_name"] == lake["LAMBDALAKE_MODEL_NAME"] and served["version"] == 1
    finally:
        serve.delete("model")

    bronze = Path(lakehouse.bronze("events"))
    files_before = DeltaTable(str(bronze)).file_uris()
    def data_files() -> set[Path]:
        return {f for f in bronze.rglob("*.parquet") if "_delta_log" not in f.parts}

    on_disk_before = data_files()
    upkeep = run_dag(home, "lambdalake_maintenance", **lake, LAMBDALAKE_DELTA_VACUUM_RETENTION_HOURS="0",
                     LAMBDALAKE_DELTA_VACUUM_ALLOW_UNSAFE_RETENTION="true")
    assert upkeep["state"] == "success", upkeep
    files_after = DeltaTable(str(bronze)).file_uris()
    assert len(files_before) > 1 and len(files_after) < len(files_before)  # compacted
    on_disk = data_files()
    assert on_disk == {Path(u.removeprefix("file://")) for u in files_after}  # vacuumed: no stale file left
    assert on_disk_before - on_disk  # the compacted files were deleted


# ------------------------------------------------------------------------------ drift
def drift_world(settings: Settings, root: Path, shift: float) -> dict[str, str]:
    """A champion whose lineage names a training set, and scored events whose features are
    drawn from the same distribution, shifted by `shift` standard deviations on two inputs."""
    from deltalake import write_deltalake

    from lakehouse import registry, scored
    from lakehouse.bundle import load_or_create_signing_key
    from lakehouse.model import write_bundle
    from speed import lake

    rng = np.random.default_rng(5)
    names = list(FRAUD_SPEC.feature_names)
    lakehouse = Lakehouse(str(root))
    train_rows = rng.normal(2.0, 1.0, size=(3000, len(names)))
    times = np.arange(3000, dtype=np.int64) * 60_000 + 1_767_225_600_000
    training = pa.table({**{n: train_rows[:, i] for i, n in enumerate(names)},
                         "label": (rng.random(3000) < 0.05).astype(np.int32),
                         "event_time_ms": times, "event_id": [f"e{i}" for i in range(3000)]})
    write_deltalake(lakehouse.training_set(FRAUD_SPEC.name), training, mode="overwrite")

    model_name = f"drift-{uuid.uuid4().hex[:6]}"
    client = registry.client(settings.mlflow_uri)
    experiment = client.get_experiment_by_name("drift-tests") or client.get_experiment(
        client.create_experiment("drift-tests"))
    split = datetime.fromtimestamp(int(times[2400]) / 1000, tz=UTC).isoformat()
    run_id = client.create_run(experiment.experiment_id, tags={
        "lineage.training_set_path": lakehouse.training_set(FRAUD_SPEC.name),
        "lineage.training_set_version": "0", "lineage.split_time": split}).info.run_id
    bundle = root / "bundle"
    write_bundle(bundle, random_model(9), {"feature_names": names,
                                           "lineage": {"spec_fingerprint": FRAUD_SPEC.fingerprint()}},
                 load_or_create_signing_key(settings.signing_key_path))
    registry.publish_bundle(client, model_name, run_id, bundle, tags={}, description="drift test",
                            alias="champion")
    client.set_terminated(run_id)

    current = rng.normal(2.0, 1.0, size=(800, len(names)))
    current[:, 0] += shift
    current[:, 5] += shift
    schema = scored.scored_schema(FRAUD_SPEC)
    scored.ensure_scored_table(lakehouse, schema)
    now = datetime.now(UTC)
    rows = [{"event_id": f"s{i}", "user_id": "u", "merchant_id": "m", "merchant_category": "grocery",
             "amount": 100, "currency": "EUR", "country": "DE", "channel": "pos",
             "event_time": int(now.timestamp() * 1_000_000), "partition": 0, "offset": i,
             "kafka_timestamp": None, "features": list(map(float, current[i])), "score": 0.1,
             "model_version": 1, "batch_run_id": None, "consumer_group": "drift-test", "scored_at": now,
             "feature_ms": 0.0, "model_ms": 0.0} for i in range(len(current))]
    lake.append_scored(lakehouse, schema, rows, {0: len(rows) - 1}, group="drift-test", topic="events")
    return {"LAMBDALAKE_DELTA_ROOT": str(root), "LAMBDALAKE_MODEL_NAME": model_name}


@pytest.mark.parametrize(("shift", "retrain"), [(0.0, False), (1.0, True)])
def test_drift_signals_retraining_only_on_shifted_data(home: dict[str, str], platform: Settings,
                                                       tmp_path: Path, shift: float, retrain: bool) -> None:
    world = drift_world(platform, Path(platform.delta_uri) / f"drift-{uuid.uuid4().hex[:6]}", shift)
    drift = run_dag(home, "lambdalake_drift", **world)
    assert drift["state"] == "success", drift
    assert drift["tasks"]["measure"] == "success"
    assert drift["tasks"]["signal_drift"] == ("success" if retrain else "skipped"), drift
    reports = sorted((platform.state_path / "drift").glob("*/report.json"))
    report = json.loads(reports[-1].read_text())
    assert report["drifted"] is retrain and report["current_rows"] == 800
    assert (reports[-1].parent / "log_amount.png").is_file()
