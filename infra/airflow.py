"""Airflow 3 as four local processes: api-server (UI on the Airflow port), scheduler,
dag-processor and triggerer, sharing a SQLite metadata DB under AIRFLOW_HOME.

Sized for a laptop: one api-server worker, LocalExecutor with small parallelism, one
parsing process. Login is Airflow's simple auth manager: user `LAMBDALAKE_AIRFLOW_USER`
(admin), and the password `LAMBDALAKE_AIRFLOW_PASSWORD` or, when that is empty, one
generated on first `up` as `airflow standalone` does, in a 0600 file under the state dir
(`settings.airflow_password_path`). `admin_password` is the one place that says which;
`lambdalake status` prints where it is, never what it is.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from infra.process import ManagedProcess
from infra.service import LOCALHOST, REPO_ROOT, Service, tool
from lakehouse.config import Settings
from lakehouse.errors import ConfigError, ServiceError
from lakehouse.secret_files import load_or_create_secret, read_secret, replace_secret

DAGS_FOLDER = REPO_ROOT / "dags"


def airflow_env(settings: Settings) -> dict[str, str]:
    """Environment that makes any `airflow` command (or `dag.test()`) use our instance."""
    home = settings.airflow_home_path
    secret = _secret(home, "jwt", lambda: secrets.token_urlsafe(72))
    fernet = _secret(home, "fernet", lambda: base64.urlsafe_b64encode(os.urandom(32)).decode())
    api = f"http://{LOCALHOST}:{settings.airflow_port}"
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # LocalExecutor forks this many workers up front (~76 MB each)
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "2",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{settings.airflow_user}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__CORE__FERNET_KEY": fernet,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__API__HOST": LOCALHOST,
        "AIRFLOW__API__PORT": str(settings.airflow_port),
        "AIRFLOW__API__BASE_URL": api,
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__SECRET_KEY": secret,
        "AIRFLOW__API_AUTH__JWT_SECRET": secret,
        "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": str(settings.airflow_pause_new_dags),
        # our packages (batch/, speed/, serving/, lakehouse/) for tasks and the DAG parser
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
        # lambdalake's own settings reach tasks unchanged
        "LAMBDALAKE_STATE_DIR": str(settings.state_path),
    }


def _secret(home: Path, name: str, make: Callable[[], str]) -> str:
    """A secret every Airflow process must share, made once per AIRFLOW_HOME (mode 0600)."""
    home.mkdir(parents=True, exist_ok=True)
    return load_or_create_secret(home / f".{name}-secret", make)


def admin_password(settings: Settings, *, create: bool = False) -> str:
    """The effective Airflow admin password: `LAMBDALAKE_AIRFLOW_PASSWORD` when set, else
    the generated one (made here when `create`, as `up` does; ConfigError saying how to get
    one otherwise). Everything that logs in (the services, the REST client, the demo,
    tests) reads it here."""
    configured = settings.airflow_password.get_secret_value()
    if configured:
        return configured
    path = settings.airflow_password_path
    if create:
        return load_or_create_secret(path, lambda: secrets.token_urlsafe(18))
    if not path.exists():
        raise ConfigError(f"no Airflow admin password yet: `lambdalake up` generates one in "
                          f"{path}, or set LAMBDALAKE_AIRFLOW_PASSWORD")
    return read_secret(path).decode().strip()


def password_location(settings: Settings) -> str:
    """Where the Airflow admin password is, for people (never the password itself)."""
    if settings.airflow_password.get_secret_value():
        return "the one set in LAMBDALAKE_AIRFLOW_PASSWORD"
    return f"in {settings.airflow_password_path}"


def write_login(settings: Settings, password: str) -> None:
    """The simple auth manager's passwords file (`{user: password}`, mode 0600)."""
    replace_secret(settings.airflow_home_path / "passwords.json",
                   json.dumps({settings.airflow_user: password}))


class AirflowService(Service):
    name = "airflow"
    start_timeout = 180.0

    @property
    def home(self) -> Path:
        return self.settings.airflow_home_path

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.settings.airflow_port,)

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.settings.airflow_port}"

    def processes(self) -> list[ManagedProcess]:
        airflow = tool("airflow")
        env = airflow_env(self.settings)
        port = str(self.settings.airflow_port)
        return [
            self.process("airflow-api-server",
                         [airflow, "api-server", "--host", LOCALHOST, "--port", port, "--workers", "1"], env),
            # --skip-serve-logs: the log servers bind 0.0.0.0 and are not needed on one
            # machine (the api-server reads task logs from AIRFLOW_HOME/logs)
            self.process("airflow-scheduler", [airflow, "scheduler", "--skip-serve-logs"], env),
            self.process("airflow-dag-processor", [airflow, "dag-processor"], env),
            self.process("airflow-triggerer", [airflow, "triggerer", "--skip-serve-logs"], env),
        ]

    def prepare(self) -> None:
        super().prepare()
        # An empty airflow.cfg stops Airflow writing one full of defaults (examples on, a
        # random JWT secret) that a command run without our environment would then use.
        (self.home / "airflow.cfg").touch()
        write_login(self.settings, admin_password(self.settings, create=True))
        result = subprocess.run(
            [tool("airflow"), "db", "migrate"],
            env={**os.environ, **airflow_env(self.settings)},
            capture_output=True,
            text=True,
            cwd=self.home,
        )
        if result.returncode != 0:
            raise ServiceError(f"airflow: `airflow db migrate` failed:\n{result.stderr[-3000:]}")

    def ready(self) -> bool:
        """The API answers and the DB, scheduler, dag-processor and triggerer are healthy."""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=3) as response:
                report = json.load(response)
        except (urllib.error.URLError, OSError, ValueError):
            return False
        parts = ("metadatabase", "scheduler", "dag_processor", "triggerer")
        return all((report.get(part) or {}).get("status") == "healthy" for part in parts)


class AirflowClient:
    """The Airflow REST API (v2) as the demo and operators' scripts use it."""

    def __init__(self, settings: Settings) -> None:
        self.base = f"http://{LOCALHOST}:{settings.airflow_port}"
        self._login = {"username": settings.airflow_user, "password": admin_password(settings)}
        self._token: str | None = None

    def call(self, method: str, path: str, body: object = None) -> dict[str, Any]:
        if self._token is None and path != "/auth/token":
            self._token = str(self.call("POST", "/auth/token", self._login)["access_token"])
        headers = {"content-type": "application/json"}
        if self._token and path != "/auth/token":
            headers["authorization"] = f"Bearer {self._token}"
        request = urllib.request.Request(f"{self.base}{path}", method=method, headers=headers,
                                         data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.load(response)  # type: ignore[no-any-return]
        except urllib.error.HTTPError as failed:
            detail = failed.read().decode(errors="replace")[:500]
            failed.close()
            raise ServiceError(f"Airflow {method} {path} answered {failed.code}: {detail}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as failed:
            reason = getattr(failed, "reason", None) or failed
            raise ServiceError(f"cannot reach Airflow at {self.base} ({method} {path}: {reason}): "
                               "start it with `lambdalake up`") from failed

    def run_dag(self, dag_id: str, *, timeout_s: float = 3600.0,
                echo: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
        """Trigger one run and await it (unpausing the DAG meanwhile if it was paused);
        its final state and task states."""
        deadline = time.monotonic() + 300
        while True:  # the dag-processor may not have parsed the DAG yet
            try:
                was_paused = bool(self.call("GET", f"/api/v2/dags/{dag_id}")["is_paused"])
                break
            except ServiceError as refused:
                # an answer (no DAG yet) is retried; an unreachable Airflow (chained) is not
                if time.monotonic() > deadline or refused.__cause__ is not None:
                    raise
                time.sleep(3)
        if was_paused:  # a paused DAG's runs do not start
            self.call("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        run = self.call("POST", f"/api/v2/dags/{dag_id}/dagRuns",
                        {"logical_date": datetime.now(UTC).isoformat()})
        run_id = run["dag_run_id"]
        echo(f"airflow: triggered {dag_id} ({run_id})")
        deadline = time.monotonic() + timeout_s
        seen: dict[str, str] = {}
        state = run["state"]
        while state not in ("success", "failed"):
            if time.monotonic() > deadline:
                raise ServiceError(f"{dag_id} run {run_id} not finished after {timeout_s:.0f}s")
            time.sleep(3)
            state = self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"]
            for ti in self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]:
                if ti["state"] and seen.get(ti["task_id"]) != ti["state"]:
                    seen[ti["task_id"]] = ti["state"]
                    echo(f"airflow: {dag_id}.{ti['task_id']} {ti['state']}")
        if was_paused:
            self.call("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": True})
        return {"dag_id": dag_id, "run_id": run_id, "state": state, "tasks": seen}

    def xcom(self, dag_id: str, run_id: str, task_id: str) -> object:
        entry = self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"
                                 "/xcomEntries/return_value?deserialize=true")
        value = entry.get("value")
        return json.loads(value) if isinstance(value, str) else value
