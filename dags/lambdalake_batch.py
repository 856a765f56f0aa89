"""
### lambdalake_batch — the batch layer, hourly at :00 UTC

**ingest** (Kafka → bronze, exactly once) → **validate** (bronze → silver + quarantine,
Great Expectations Data Docs; fails above `LAMBDALAKE_BATCH_MAX_FAILURE_RATE`) → **views**
(every feature view recomputed up to the boundary, then the run is published).

Publishing updates the Asset `lambdalake/batch_views`: the speed layer and the serving
layer pick the new run up by themselves. The logic lives in `batch/jobs.py`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, CronTriggerTimetable, dag, task

BATCH_VIEWS = Asset("lambdalake/batch_views")


@dag(
    dag_id="lambdalake_batch",
    # no start_date: the first run waits for the next slot instead of running at once
    schedule=CronTriggerTimetable("0 * * * *", timezone="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["lambdalake", "batch"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1),
                  "execution_timeout": timedelta(minutes=60)},
)
def lambdalake_batch() -> None:
    @task
    def ingest() -> dict[str, Any]:
        from batch import jobs
        from lakehouse.config import load_settings
        from lakehouse.fraud import FRAUD_SPEC

        return jobs.ingest(load_settings(), FRAUD_SPEC)

    @task
    def validate() -> dict[str, Any]:
        from batch import jobs
        from lakehouse.config import load_settings
        from lakehouse.fraud import FRAUD_SPEC

        return jobs.validate(load_settings(), FRAUD_SPEC)

    @task(outlets=[BATCH_VIEWS])
    def views() -> dict[str, Any]:
        from batch import jobs
        from lakehouse.config import load_settings
        from lakehouse.fraud import FRAUD_SPEC

        return jobs.views(load_settings(), FRAUD_SPEC)

    ingest() >> validate() >> views()


lambdalake_batch()
