"""
### lambdalake_maintenance — Delta table upkeep, daily at 02:00 UTC

**optimize_vacuum_checkpoint**: for every table of the lakehouse (bronze, silver,
quarantine, gold, training set, batch runs, scored events): OPTIMIZE (compacts small files
without changing a row), VACUUM (files unreferenced for longer than
`LAMBDALAKE_DELTA_VACUUM_RETENTION_HOURS`, which bounds time travel) and a Delta log
checkpoint. delta-rs does the work; no Spark is started. The logic lives in
`batch/maintenance.py`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import CronTriggerTimetable, dag, task


@dag(
    dag_id="lambdalake_maintenance",
    # no start_date: the first run waits for the next slot instead of running at once
    schedule=CronTriggerTimetable("0 2 * * *", timezone="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["lambdalake", "maintenance"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=5),
                  "execution_timeout": timedelta(minutes=60)},
)
def lambdalake_maintenance() -> None:
    @task
    def optimize_vacuum_checkpoint() -> list[dict[str, Any]]:
        from batch import jobs
        from lakehouse.config import load_settings
        from lakehouse.fraud import FRAUD_SPEC

        return jobs.maintenance(load_settings(), FRAUD_SPEC)

    optimize_vacuum_checkpoint()


lambdalake_maintenance()
