"""Shared fixtures.

Integration tests run against a real platform that the `platform` fixture starts once per
session with `lambdalake up` (Kafka, MLflow, Ray + Serve, Airflow) and stops at the end. It
uses its own state dir (var/test) and its own ports, so it never touches a platform a
developer has running on the default ports. Unit tests use none of these fixtures.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lakehouse.config import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent

# LAMBDALAKE_TEST_SLOT=N (default 0) lets N+1 integration runs share a machine: slot N has
# its own state dir and its ports are the defaults plus 10000 × (N + 1).
SLOT = int(os.environ.get("LAMBDALAKE_TEST_SLOT", "0") or 0)
TEST_STATE = REPO / "var" / ("test" if SLOT == 0 else f"test-{SLOT}")
_SHIFT = 10000 * (SLOT + 1)

# Ports of the test platform: the defaults plus 10000 (slot 0).
TEST_ENV = {
    "LAMBDALAKE_STATE_DIR": str(TEST_STATE),
    "LAMBDALAKE_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{9092 + _SHIFT}",
    "LAMBDALAKE_MLFLOW_PORT": str(5000 + _SHIFT),
    "LAMBDALAKE_REDIS_PORT": str(6390 + _SHIFT),
    "LAMBDALAKE_RAY_ADDRESS": f"127.0.0.1:{6379 + _SHIFT}",
    "LAMBDALAKE_SERVE_HTTP_PORT": str(8000 + _SHIFT),
    "LAMBDALAKE_API_PORT": str(8001 + _SHIFT),
    "LAMBDALAKE_SPEED_METRICS_PORT": str(9108 + _SHIFT),
    # the DAGs' schedules would run the pipelines against the test platform mid-suite
    "LAMBDALAKE_AIRFLOW_PAUSE_NEW_DAGS": "true",
    "LAMBDALAKE_AIRFLOW_PORT": str(8080 + _SHIFT),
    "LAMBDALAKE_RAY_OBJECT_STORE_MEMORY_MB": "256",
    "LAMBDALAKE_SPARK_DRIVER_MEMORY": "1g",
}
if SLOT >= 6:
    raise ValueError(f"LAMBDALAKE_TEST_SLOT={SLOT}: use 0 to 5 (ports above 65535 otherwise)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `platform_teardown` stop the shared platform, so they run last."""
    items.sort(key=lambda item: item.get_closest_marker("platform_teardown") is not None)


def lambdalake(*args: str, env: dict[str, str] | None = None, timeout: float = 600,
               check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real `lambdalake` console script of this environment."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lambdalake"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        cwd=REPO,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"lambdalake {' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
        )
    return result


@pytest.fixture(scope="session")
def test_env() -> Iterator[dict[str, str]]:
    """LAMBDALAKE_* variables of the test platform, also set in this process."""
    saved = {key: os.environ.get(key) for key in TEST_ENV}
    os.environ.update(TEST_ENV)
    yield dict(TEST_ENV)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def settings(test_env: dict[str, str]) -> Settings:
    return load_settings()


@pytest.fixture(scope="session")
def platform(settings: Settings, test_env: dict[str, str]) -> Iterator[Settings]:
    """A running platform with fresh state (jars kept); stopped when the session ends."""
    lambdalake("down", check=False)
    if TEST_STATE.exists():
        for child in TEST_STATE.iterdir():
            if child.name != "jars":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    lambdalake("up", timeout=900)
    yield settings
    lambdalake("down")


@pytest.fixture(scope="session")
def ray_cluster(platform: Settings) -> Iterator[Settings]:
    """This process joined to the platform's Ray head, once per session (Serve handles keep
    background tasks bound to the session that made them)."""
    from lakehouse.serve import ray_local_env

    os.environ.update(ray_local_env())  # before Ray is imported: it reads them at import
    import ray

    ray.init(address=platform.ray_address, log_to_driver=False)
    yield platform
    ray.shutdown()


@pytest.fixture(scope="session")
def spark(settings: Settings):  # type: ignore[no-untyped-def]
    """One Spark session (local, Delta + Kafka jars) for the whole test run."""
    from infra.jvm import ensure_jars
    from lakehouse.spark import spark_session

    ensure_jars(settings.jars_dir)
    session = spark_session(settings, app_name="lambdalake-tests")
    yield session
    session.stop()
