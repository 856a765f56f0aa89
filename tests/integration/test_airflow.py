"""Airflow on the platform: the DAGs in dags/ parse with zero import errors, the documented
login works, and a DAG runs to success on the real scheduler and executor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

import pytest

from infra.airflow import DAGS_FOLDER, admin_password, airflow_env
from lakehouse.config import Settings
from lakehouse.fraud import FRAUD_SPEC

pytestmark = pytest.mark.integration

LAMBDALAKE_DAGS = {"lambdalake_batch", "lambdalake_train", "lambdalake_drift", "lambdalake_maintenance"}


def _api(settings: Settings, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{settings.airflow_port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"content-type": "application/json",
                 **({"authorization": f"Bearer {token}"} if token else {})},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def token(platform: Settings) -> str:
    answer = _api(platform, "POST", "/auth/token",
                  {"username": platform.airflow_user, "password": admin_password(platform)})
    return str(answer["access_token"])


def test_dags_parse_offline_with_zero_import_errors(settings: Settings) -> None:
    """Parse dags/ in a fresh interpreter, as the dag-processor does."""
    script = (
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(DAGS_FOLDER)!r})\n"
        "import json; print(json.dumps({'errors': {k: str(v) for k, v in bag.import_errors.items()},"
        " 'dags': sorted(bag.dag_ids)}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, **airflow_env(settings)}, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    parsed = json.loads(result.stdout.strip().splitlines()[-1])
    assert parsed["errors"] == {}
    assert {"lambdalake_setup", *LAMBDALAKE_DAGS} <= set(parsed["dags"])


def test_wrong_password_is_refused(platform: Settings) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        _api(platform, "POST", "/auth/token", {"username": platform.airflow_user, "password": "wrong"})
    assert refused.value.code == 401
    refused.value.close()


def test_the_login_is_the_generated_password_not_admin(platform: Settings) -> None:
    """`up` generated the admin password (the test platform sets none) in a 0600 file, and
    Airflow's own copy of it is 0600 too; the old default admin / admin is refused."""
    import stat

    assert not platform.airflow_password.get_secret_value()
    for path in (platform.airflow_password_path, platform.airflow_home_path / "passwords.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert admin_password(platform) != "admin"
    with pytest.raises(urllib.error.HTTPError) as refused:
        _api(platform, "POST", "/auth/token", {"username": "admin", "password": "admin"})
    assert refused.value.code == 401
    refused.value.close()


def test_scheduler_sees_dags_without_import_errors(platform: Settings, token: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        dags = {d["dag_id"] for d in _api(platform, "GET", "/api/v2/dags", token=token)["dags"]}
        if "lambdalake_setup" in dags:
            break
        time.sleep(2)
    assert "lambdalake_setup" in dags
    assert _api(platform, "GET", "/api/v2/importErrors", token=token)["total_entries"] == 0


def test_setup_dag_runs_to_success(platform: Settings, token: str) -> None:
    test_scheduler_sees_dags_without_import_errors(platform, token)
    _api(platform, "PATCH", "/api/v2/dags/lambdalake_setup", {"is_paused": False}, token=token)
    run = _api(platform, "POST", "/api/v2/dags/lambdalake_setup/dagRuns",
               {"logical_date": datetime.now(UTC).isoformat()}, token=token)
    run_id = run["dag_run_id"]
    deadline = time.monotonic() + 240
    state = run["state"]
    while time.monotonic() < deadline and state not in ("success", "failed"):
        time.sleep(2)
        state = _api(platform, "GET", f"/api/v2/dags/lambdalake_setup/dagRuns/{run_id}", token=token)["state"]
    assert state == "success"
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=platform.kafka_bootstrap_servers)
    try:
        assert set(FRAUD_SPEC.topics) <= set(admin.list_topics())
    finally:
        admin.close()


def test_headless_chromium_logs_into_the_ui_and_sees_the_dags(platform: Settings, token: str) -> None:
    """What an operator does: open the UI, log in with the README's login, see the DAGs."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    test_scheduler_sees_dags_without_import_errors(platform, token)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=DriverService("/usr/bin/chromedriver"), options=options)
    try:
        base = f"http://127.0.0.1:{platform.airflow_port}"
        browser.get(f"{base}/dags")
        wait = WebDriverWait(browser, 90)
        user = wait.until(expected_conditions.visibility_of_element_located((By.NAME, "username")))
        user.send_keys(platform.airflow_user)
        browser.find_element(By.NAME, "password").send_keys(admin_password(platform), Keys.ENTER)
        wait.until(lambda b: all(dag in b.page_source for dag in LAMBDALAKE_DAGS))
        assert "lambdalake_setup" in browser.page_source
    finally:
        browser.quit()
