"""
### lambdalake_train — a new model, daily, on demand, and when drift is detected

**training_set** (point-in-time features of the latest published batch run, labels known
so far) → **train** (TorchDistributor; holdout evaluation with ROC/PR/calibration plots;
signed bundle; MLflow version; promoted to `champion` only if it beats the current one on
the same holdout, else `challenger`) → **roll_out** (the Ray Serve model service serves
the new champion: deployed if absent, else its registry poller swaps it in; the task waits
until it does).

Scheduled daily at 03:00 UTC and whenever `lambdalake_drift` updates the Asset
`lambdalake/drift`. Evaluation, registration and promotion are one task: they share the
holdout scores and one MLflow run. The logic lives in `batch/jobs.py` and `batch/train.py`;
the roll-out, above the layers, in `infra/rollout.py`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, dag, task

DRIFT = Asset("lambdalake/drift")
CHAMPION = Asset("lambdalake/champion")


@dag(
    dag_id="lambdalake_train",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 3 * * *", timezone="UTC"),
                                 assets=DRIFT),
    # no start_date: the first run waits for the next slot instead of running at once
    catchup=False,
    max_active_runs=1,
    tags=["lambdalake", "training"],
    doc_md=__doc__,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=2),
                  "execution_timeout": timedelta(hours=2)},
)
def lambdalake_train() -> None:
    @task
    def training_set() -> dict[str, Any]:
        from batch import jobs
        from lakehouse.config import load_settings
        from lakehouse.fraud import FRAUD_SPEC

        return jobs.training_set(load_settings(), FRAUD_SPEC)

    @task
    def train(built: dict[str, Any]) -> dict[str, Any]:
        from batch import jobs
        from lakehouse.config import load_settings
        from lakehouse.fraud import FRAUD_SPEC

        return jobs.train(load_settings(), FRAUD_SPEC, built)

    @task(outlets=[CHAMPION], execution_timeout=timedelta(minutes=10))
    def roll_out(trained: dict[str, Any]) -> dict[str, Any]:
        from infra.rollout import roll_out
        from lakehouse.config import load_settings

        return roll_out(load_settings(), trained)

    # TaskFlow hands each task its upstream's XCom at run time
    roll_out(train(training_set()))  # type: ignore[arg-type]


lambdalake_train()
