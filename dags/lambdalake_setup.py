"""
### lambdalake_setup

Prepares the platform for the pipelines: creates the spec's Kafka topics (events, labels and
the dead-letter queue) and checks that Kafka and the MLflow tracking server answer.
Idempotent: run it after `lambdalake up` or whenever a topic may be missing.

The logic lives in `lakehouse/` and `infra/`; this file only declares the DAG.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task


@dag(
    dag_id="lambdalake_setup",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["lambdalake"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=10),
                  "execution_timeout": timedelta(minutes=5)},
)
def lambdalake_setup() -> None:
    @task
    def create_topics() -> list[str]:
        from lakehouse.config import load_settings
        from lakehouse.fraud import FRAUD_SPEC
        from lakehouse.streams import ensure_topics

        settings = load_settings()
        ensure_topics(settings, FRAUD_SPEC.topics,
                      partitions=settings.kafka_partitions)
        return list(FRAUD_SPEC.topics)

    @task
    def check_mlflow() -> str:
        import urllib.error
        import urllib.request

        from lakehouse.config import load_settings
        from lakehouse.errors import ServiceError

        uri = load_settings().mlflow_uri
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=10) as response:
                if response.status != 200:
                    raise ServiceError(f"MLflow at {uri} answered {response.status}: see "
                                       "`lambdalake status`")
        except urllib.error.HTTPError as exc:
            raise ServiceError(f"MLflow at {uri} answered {exc.code}: see "
                               "`lambdalake status`") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ServiceError(f"cannot reach MLflow at {uri} ({getattr(exc, 'reason', exc)}): "
                               "start it with `lambdalake up`") from exc
        return uri

    create_topics() >> check_mlflow()


lambdalake_setup()
