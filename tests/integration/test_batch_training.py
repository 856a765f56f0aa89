"""Training: point-in-time features against an independent recomputation and against the
generator's truth, the label cut-off, model quality against the Bayes-optimal score,
champion/challenger promotion and signed bundles in the MLflow registry."""

from __future__ import annotations

import dataclasses
import json
import math
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from batch.ingest import ingest_topics
from batch.train import TrainOptions, holdout_split, read_rows, train_model
from batch.training_set import LABEL_TIME_MS, build_training_set
from batch.validate import validate_topic
from batch.views import compute_views
from lakehouse import registry
from lakehouse.bundle import ModelSignatureError, load_verify_key, verify_bundle
from lakehouse.config import Settings
from lakehouse.fraud import CHARGEBACK_LABELS, FRAUD_SPEC, TRANSACTIONS
from lakehouse.generator import GeneratorOptions, fraud_probability, generate, write_truth
from lakehouse.streams import ensure_topics, producer
from lakehouse.tables import EVENT_TIME_MS, Lakehouse
from tests.oracle import fraud_features, kafka_arrival, point_in_time_states

pytestmark = pytest.mark.integration

EVENTS = 80_000  # ~1.5k frauds: enough for a holdout AUC within a point of its truth
SEED = 11


@dataclasses.dataclass
class Prepared:
    lakehouse: Lakehouse
    spec: Any
    run: Any
    training_set: Any
    truth: dict[str, dict[str, Any]]  # event_id → truth row (valid and late events)


@pytest.fixture(scope="module")
def prepared(spark, platform: Settings, tmp_path_factory: pytest.TempPathFactory) -> Prepared:  # type: ignore[no-untyped-def]
    suffix = uuid.uuid4().hex[:8]
    events_topic, labels_topic = f"events-{suffix}", f"labels-{suffix}"
    ensure_topics(platform.kafka_bootstrap_servers, [events_topic, labels_topic],
                  partitions=platform.kafka_partitions)
    spec = dataclasses.replace(
        FRAUD_SPEC,
        events=dataclasses.replace(TRANSACTIONS, topic=events_topic),
        labels=dataclasses.replace(CHARGEBACK_LABELS, topic=labels_topic),
    )
    lakehouse = Lakehouse(f"{platform.delta_uri}/train-{suffix}")
    messages = list(generate(GeneratorOptions(events=EVENTS, seed=SEED)))
    kafka = producer(platform.kafka_bootstrap_servers)
    for m in messages:
        kafka.send(events_topic if m.topic == TRANSACTIONS.topic else labels_topic,
                   key=m.key, value=m.value)
    kafka.flush()
    kafka.close()
    truth_path = tmp_path_factory.mktemp("truth") / "truth.parquet"
    write_truth(messages, truth_path)
    truth = {row["event_id"]: row for row in pq.read_table(truth_path).to_pylist()
             if row["kind"] in ("valid", "late")}

    ingest_topics(spark, lakehouse, bootstrap_servers=platform.kafka_bootstrap_servers,
                  topics=[events_topic, labels_topic])
    gx_dir = Path(lakehouse.root) / "gx"
    for schema in (spec.events, spec.labels):
        validate_topic(spark, lakehouse, schema, gx_dir=gx_dir)
    run = compute_views(spark, lakehouse, spec)
    training_set = build_training_set(spark, lakehouse, spec, run)
    return Prepared(lakehouse, spec, run, training_set, truth)


def _silver_events(spark, prepared: Prepared) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    rows = spark.read.format("delta").load(prepared.lakehouse.silver("transaction")).collect()
    events = []
    for r in rows:
        event = r.asDict()
        event["event_time"] = round(r["event_time"].timestamp() * 1000)
        events.append(event)
    return events


def _oracle_states(spec: Any, events: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Each event's view states from the events of its entities that arrived before it, by
    the test oracle (never lakehouse.features): users by Kafka offset, merchants by (event
    time, partition, offset)."""
    states = point_in_time_states(spec.views, events, spec.events.time_field,
                                  arrival=kafka_arrival(spec))
    return {e["event_id"]: before for e, before in zip(events, states, strict=True)}


def test_training_features_are_point_in_time(spark, prepared: Prepared) -> None:  # type: ignore[no-untyped-def]
    """Every training vector equals the model inputs over the events strictly before it,
    recomputed by the test oracle (states and inputs by hand); and where a user's history
    has no late event (arrival order = event-time order), the generator's true probability
    of the features equals p_true: the platform's features are the ones the labels were
    drawn from."""
    events = _silver_events(spark, prepared)
    by_id = {e["event_id"]: e for e in events}
    expected_states = _oracle_states(prepared.spec, events)
    rows = spark.read.format("delta").option("versionAsOf", prepared.training_set.version).load(
        prepared.training_set.path).collect()
    assert len(rows) == prepared.training_set.rows > 0.9 * EVENTS
    names = FRAUD_SPEC.feature_names
    users_with_late = {prepared.truth[i]["user_id"] for i, t in prepared.truth.items() if t["kind"] == "late"}
    checked_truth = first_events = 0
    for row in rows:
        event = by_id[row["event_id"]]
        expected = fraud_features(expected_states[row["event_id"]], event)
        got = [row[n] for n in names]
        assert got == expected, (row["event_id"], dict(zip(names, got, strict=True)),
                                 dict(zip(names, expected, strict=False)))
        first_events += expected_states[row["event_id"]]["user_all"]["count"] == 0
        truth = prepared.truth[row["event_id"]]
        if truth["user_id"] not in users_with_late:
            assert fraud_probability(dict(zip(names, got, strict=True))) == pytest.approx(truth["p_true"], abs=1e-12)
            checked_truth += 1
    assert checked_truth > 0.3 * len(rows)  # ~40% of users have some late event
    assert first_events > 0  # users' first events see an empty history, not themselves


def test_only_labels_known_at_the_cutoff_count(spark, prepared: Prepared) -> None:  # type: ignore[no-untyped-def]
    label_times = sorted(t["label_time_ms"] for t in prepared.truth.values())
    cutoff = label_times[len(label_times) // 2]
    limited = build_training_set(spark, prepared.lakehouse, prepared.spec, prepared.run,
                                 label_cutoff_ms=cutoff)
    rows = spark.read.format("delta").option("versionAsOf", limited.version).load(limited.path)
    assert limited.rows == sum(1 for t in label_times if t <= cutoff) == rows.count()
    assert rows.agg({LABEL_TIME_MS: "max"}).collect()[0][0] <= cutoff
    assert limited.rows < prepared.training_set.rows


def test_model_quality_promotion_and_signed_registry(spark, platform: Settings, prepared: Prepared,  # type: ignore[no-untyped-def]
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="lambdalake.audit")
    settings = platform.model_copy(update={"model_name": f"fraud-it-{uuid.uuid4().hex[:6]}"})
    weak = TrainOptions(epochs=1, max_train_rows=300, hidden=(2,), seed=3)
    good = TrainOptions.from_settings(settings)

    def train(options: TrainOptions):  # type: ignore[no-untyped-def]
        return train_model(spark, settings, prepared.spec, lakehouse=prepared.lakehouse,
                           options=options, training_set=prepared.training_set)

    first = train(weak)
    assert (first.alias, first.champion_before) == (registry.CHAMPION, None)

    better = train(good)
    assert better.alias == registry.CHAMPION, better.reason
    assert better.champion_before is not None and better.champion_before["version"] == first.version
    # quality: AUC >= 0.9 and within 2% of the Bayes-optimal AUC on the very same holdout
    from sklearn.metrics import roc_auc_score

    x, y, times = read_rows(prepared.training_set.path, prepared.training_set.version,
                            list(FRAUD_SPEC.feature_names))
    assert better.split_time_ms == holdout_split(times, good.holdout_fraction)
    ids = spark.read.format("delta").option("versionAsOf", prepared.training_set.version).load(
        prepared.training_set.path).select("event_id", EVENT_TIME_MS, "label").collect()
    holdout = [r for r in ids if r[EVENT_TIME_MS] >= better.split_time_ms]
    bayes = roc_auc_score([r["label"] for r in holdout],
                          [prepared.truth[r["event_id"]]["p_true"] for r in holdout])
    print(f"holdout ROC AUC {better.metrics['roc_auc']:.4f}, Bayes-optimal {bayes:.4f}")
    assert better.metrics["rows"] == len(holdout)
    assert better.metrics["roc_auc"] >= 0.9
    assert better.metrics["roc_auc"] >= 0.98 * bayes

    worse = train(weak)
    assert worse.alias == registry.CHALLENGER, worse.reason
    client = registry.client(settings.mlflow_uri)
    assert int(client.get_model_version_by_alias(settings.model_name, "champion").version) == better.version
    assert int(client.get_model_version_by_alias(settings.model_name, "challenger").version) == worse.version
    # every alias move is in the audit log: what moved, from which version, who and why
    moves = [entry for entry in (json.loads(r.getMessage()) for r in caplog.records
                                 if r.name == "lambdalake.audit")
             if entry.get("event") == "model_alias_moved" and entry["model"] == settings.model_name]
    assert [(m["alias"], m["version"], m["previous_version"]) for m in moves] == [
        (registry.CHAMPION, first.version, None), (registry.CHAMPION, better.version, first.version),
        (registry.CHALLENGER, worse.version, None)]
    assert [m["why"] for m in moves] == [first.reason, better.reason, worse.reason]
    assert [m["mlflow_run_id"] for m in moves] == [first.mlflow_run_id, better.mlflow_run_id,
                                                   worse.mlflow_run_id]
    assert all(m["who"] for m in moves)

    # the registered bundle is the signed one, with lineage and plots logged beside it
    version = client.get_model_version(settings.model_name, str(better.version))
    bundle = registry.download_bundle(client, version)
    manifest = verify_bundle(bundle, load_verify_key(settings.verify_key_path))
    assert manifest["lineage"]["batch_run_id"] == prepared.run.run_id
    assert manifest["lineage"]["training_set_version"] == str(prepared.training_set.version)
    assert manifest["lineage"]["spec_fingerprint"] == prepared.spec.fingerprint()
    assert manifest["spec_fingerprint"] == prepared.spec.fingerprint()  # what scorers check
    assert manifest["feature_names"] == list(prepared.spec.feature_names)
    assert math.isclose(manifest["metrics"]["roc_auc"], better.metrics["roc_auc"])
    run = client.get_run(better.mlflow_run_id)
    assert run.data.tags["lineage.batch_run_id"] == prepared.run.run_id
    assert run.data.metrics["holdout_roc_auc"] == pytest.approx(better.metrics["roc_auc"])
    plots = {Path(a.path).name for a in client.list_artifacts(better.mlflow_run_id, "plots")}
    assert plots == {"roc.png", "pr.png", "calibration.png", "loss.png"}
    weights = bundle / "model.pt"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    with pytest.raises(ModelSignatureError):
        verify_bundle(bundle, load_verify_key(settings.verify_key_path))
    assert np.isfinite(x).all() and set(np.unique(y)) == {0.0, 1.0}
