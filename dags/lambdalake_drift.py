"""
### lambdalake_drift — feature drift of the scored stream, hourly at :30

**measure**: the feature vectors the speed layer scored in the last
`LAMBDALAKE_DRIFT_WINDOW_HOURS` against the champion's training rows: PSI and the
Kolmogorov-Smirnov statistic per feature; a histogram PNG per feature and `report.json`
under `var/drift/<time>/`. **signal_drift** runs only when some feature's PSI exceeds
`LAMBDALAKE_DRIFT_PSI_THRESHOLD` (with at least `LAMBDALAKE_DRIFT_MIN_EVENTS` events): it
updates the Asset `lambdalake/drift`, which schedules `lambdalake_train`.

The logic lives in `batch/drift.py`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, CronTriggerTimetable, dag, task

DRIFT = Asset("lambdalake/drift")


@dag(
    dag_id="lambdalake_drift",
    # no start_date: the first run waits for the next slot instead of running at once
    schedule=CronTriggerTimetable("30 * * * *", timezone="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["lambdalake", "monitoring"],
    doc_md=__doc__,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=1),
                  "execution_timeout": timedelta(minutes=20)},
)
def lambdalake_drift() -> None:
    @task
    def measure() -> dict[str, Any]:
        from batch import jobs
        from lakehouse.config import load_settings
        from lakehouse.fraud import FRAUD_SPEC

        return jobs.drift(load_settings(), FRAUD_SPEC)

    @task.short_circuit
    def drifted(report: dict[str, Any]) -> bool:
        print(report["reason"])  # noqa: T201 - the task log
        return bool(report["drifted"])

    @task(outlets=[DRIFT])
    def signal_drift(report: dict[str, Any]) -> str:
        return f"retraining: {report['reason']}"

    report = measure()
    # TaskFlow hands each task its upstream's XCom at run time
    drifted(report) >> signal_drift(report)  # type: ignore[arg-type]


lambdalake_drift()
