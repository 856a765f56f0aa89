"""`lambdalake demo` (what `make demo` runs after `up`) on the test platform, smaller: the
DAGs through the real Airflow scheduler, the speed layer and the API as managed apps, and a
DEMO_SUMMARY with non-zero counts at every stage and a passed exact-merge check."""

from __future__ import annotations

import json

import pytest

from infra.platform import Platform
from lakehouse.config import Settings
from lakehouse.fraud import TRANSACTIONS
from lakehouse.generator import GeneratorOptions, generate
from tests.conftest import lambdalake

pytestmark = pytest.mark.integration


def test_demo_runs_end_to_end_and_proves_the_exact_merge(ray_cluster: Settings) -> None:
    from ray import serve

    try:
        result = lambdalake("demo", "--events", "20000", "--stream", "1000", "--rate", "500", timeout=1800)
        lines = [line for line in result.stdout.splitlines() if line.startswith("DEMO_SUMMARY ")]
        assert len(lines) == 1, result.stdout[-3000:]
        summary = json.loads(lines[0].removeprefix("DEMO_SUMMARY "))
        counts = summary["counts"]
        assert all(count > 0 for count in counts.values()), counts
        assert summary["exact_merge"]["passed"] and summary["exact_merge"]["mismatches"] == 0
        # nothing lost, exactly: every record in bronze, in silver or quarantine; every record
        # above the batch run's boundary (the speed layer resumes there) scored or in the DLQ;
        # the valid events are the generator's own count (the stream and the probe on top of
        # what the batch found valid)
        assert counts["bronze_events"] == counts["kafka_events_at_batch"]
        assert counts["silver_events"] + counts["quarantined_events"] == counts["bronze_events"]
        assert counts["kafka_events_in_batch_run"] == counts["bronze_events"]
        assert counts["scored_events"] + counts["kafka_dlq"] == \
            counts["kafka_events"] - counts["kafka_events_in_batch_run"]
        streamed = [m for m in generate(GeneratorOptions(events=1000, seed=summary["seed"] + 1))
                    if m.topic == TRANSACTIONS.topic]
        assert counts["kafka_events"] == counts["kafka_events_at_batch"] + len(streamed) + 1
        streamed_valid = sum(1 for m in streamed if m.kind in ("valid", "late"))
        assert summary["exact_merge"]["valid_events"] == counts["silver_events"] + streamed_valid + 1
        batch_valid = sum(1 for m in generate(GeneratorOptions(events=20_000, seed=summary["seed"]))
                          if m.kind in ("valid", "late"))
        assert counts["silver_events"] >= batch_valid  # and what earlier tests sent to the topic
        assert summary["model"]["version"] >= 1 and 0.5 < summary["model"]["roc_auc"] <= 1.0
        assert summary["predict"]["model_version"] == summary["model"]["version"] or \
            summary["model"]["alias"] != "champion"
        assert 0 < summary["freshness_ms"] < 120_000 and summary["predict"]["p50_ms"] > 0
        assert "Airflow UI" in result.stdout and "HTTP API" in result.stdout
        health = {h.service: h.healthy for h in Platform(ray_cluster).status()}
        assert health.get("speed") and health.get("api"), health  # left running, healthy
    finally:
        for app in Platform(ray_cluster).apps:
            app.stop()
        if "model" in serve.status().applications:
            serve.delete("model")
