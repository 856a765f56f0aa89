"""`lambdalake up | status | down`: idempotent up, honest status, a clean down, and failed
starts that say what to do and leave nothing half-running."""

from __future__ import annotations

import json
import os
import socket
import sys
import urllib.request
from pathlib import Path

import pytest

from infra.apps import SpeedApp
from infra.platform import Platform
from infra.process import port_open, wait_until
from infra.supervisor import Backoff
from lakehouse.config import Settings, load_settings
from tests.conftest import lambdalake

pytestmark = pytest.mark.integration


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_status_shows_every_service_healthy(platform: Settings) -> None:
    result = lambdalake("status", "--json")
    services = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert {s["service"] for s in services} == {"kafka", "redis", "mlflow", "ray", "airflow"}
    assert all(s["healthy"] and s["pids"] for s in services), services
    urls = {s["service"]: s["url"] for s in services}
    assert urls["airflow"] == f"http://127.0.0.1:{platform.airflow_port}"
    assert urls["mlflow"] == f"http://127.0.0.1:{platform.mlflow_port}"
    assert urls["redis"] == f"redis://127.0.0.1:{platform.redis_port}/0"


def test_up_again_changes_nothing(platform: Settings) -> None:
    before = {h.service: h.pids for h in Platform(platform).status()}
    result = lambdalake("up")
    assert result.stderr.count("already running") == 5
    after = {h.service: h.pids for h in Platform(platform).status()}
    assert after == before


def test_kafka_is_the_apache_jvm_broker(platform: Settings) -> None:
    kafka = next(h for h in Platform(platform).status() if h.service == "kafka")
    command = _cmdline(kafka.pids[0])
    assert "java" in command.split()[0] and " kafka.Kafka " in command
    assert "kafka_2.13-4.4.0.jar" in os.listdir(platform.jars_dir / "kafka")
    assert port_open("127.0.0.1", platform.kafka_port)


def _small_platform_env(tmp_path: Path, offset: int) -> dict[str, str]:
    """A second platform with only Kafka and MLflow, on ports of its own."""
    return {
        "LAMBDALAKE_STATE_DIR": str(tmp_path / "state"),
        "LAMBDALAKE_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{29092 + offset}",
        "LAMBDALAKE_MLFLOW_PORT": str(25000 + offset),
        "LAMBDALAKE_MANAGE_RAY": "false",
        "LAMBDALAKE_MANAGE_AIRFLOW": "false",
        "LAMBDALAKE_MANAGE_REDIS": "false",
    }


def test_taken_port_is_reported_and_nothing_starts(platform: Settings, tmp_path: Path) -> None:
    env = _small_platform_env(tmp_path, 0)
    (tmp_path / "state").mkdir()
    os.symlink(platform.jars_dir, tmp_path / "state" / "jars")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 25000))
        squatter.listen()
        result = lambdalake("up", env=env, check=False)
    assert result.returncode == 1
    assert "port 25000 is already in use" in result.stderr
    assert "pid" in result.stderr  # names who holds it
    assert not port_open("127.0.0.1", 29092)


def test_failed_start_stops_what_it_started(platform: Settings, tmp_path: Path) -> None:
    env = {**_small_platform_env(tmp_path, 10), "LAMBDALAKE_KAFKA_HEAP": "1k"}
    (tmp_path / "state").mkdir()
    os.symlink(platform.jars_dir, tmp_path / "state" / "jars")
    result = lambdalake("up", env=env, check=False, timeout=300)
    assert result.returncode == 1
    assert "kafka: kafka exited during start-up" in result.stderr
    assert "heap" in result.stderr.lower()  # the log tail explains why
    # MLflow had been started by this call: it must be gone again
    leftover = Platform(load_settings(state_dir=tmp_path / "state", mlflow_port=25010,
                                      manage_ray=False, manage_airflow=False, manage_redis=False,
                                      kafka_bootstrap_servers="127.0.0.1:29102")).status()
    assert all(not h.pids for h in leftover), leftover
    assert not port_open("127.0.0.1", 25010)


def test_missing_java_says_how_to_install_it(platform: Settings, tmp_path: Path) -> None:
    env = {**_small_platform_env(tmp_path, 20), "JAVA_HOME": str(tmp_path / "no-jdk")}
    (tmp_path / "state").mkdir()
    os.symlink(platform.jars_dir, tmp_path / "state" / "jars")
    result = lambdalake("up", env=env, check=False)
    assert result.returncode == 1
    assert "Java 17+ is required" in result.stderr and "JAVA_HOME" in result.stderr
    assert not port_open("127.0.0.1", 25020)


class _PoisonedSpeed(SpeedApp):
    """The speed app crash-looping as on a poison record, so the test needs no model."""

    backoff = Backoff(initial_s=0.5, factor=2, max_s=2, reset_after_s=60)

    def command(self) -> list[str]:
        return [sys.executable, "-c", "import sys; sys.stderr.write('Traceback (most recent "
                "call last):\\nRecursionError: maximum recursion depth exceeded\\n'); sys.exit(1)"]


def test_status_lists_a_crash_looping_app_with_its_last_error(platform: Settings) -> None:
    speed = _PoisonedSpeed(platform)
    speed.start()
    try:
        assert wait_until(lambda: (speed.state() or {}).get("restarts", 0) >= 2, timeout=30)
        result = lambdalake("status", "--json", check=False)
        assert result.returncode == 3  # not healthy
        entries = {e["service"]: e for e in (json.loads(line) for line in
                                             result.stdout.splitlines() if line.startswith("{"))}
        app = entries["speed"]  # never omitted
        assert not app["healthy"] and app["state"] in ("restarting", "starting", "running")
        assert app["restarts"] >= 2 and app["last_exit"] == "exit code 1"
        assert "RecursionError: maximum recursion depth exceeded" in app["last_error"]
        assert app["pids"] and app["pids"][0] == speed.supervisor.pid()
        table = lambdalake("status", check=False).stdout
        assert "speed last exited with exit code 1" in table and "RecursionError" in table
        with urllib.request.urlopen(speed.metrics_url, timeout=5) as answer:
            metrics = answer.read().decode()
        restarts = [line for line in metrics.splitlines()
                    if line.startswith('lambdalake_app_restarts_total{app="speed"}')]
        assert restarts and float(restarts[0].split()[-1]) >= 2, metrics
        assert 'lambdalake_app_up{app="speed"}' in metrics
    finally:
        speed.stop()
    assert not speed.pids() and speed.state() is None
    listed = [json.loads(line)["service"] for line in
              lambdalake("status", "--json", check=False).stdout.splitlines() if line.startswith("{")]
    assert "speed" not in listed  # stopped on purpose: no longer part of the platform


def _process_line(pid: int) -> str:
    """`pid (state) command line` of a process, for a failure message."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return f"{pid} (gone)"
    return f"{pid} ({state}) {command[:200]}"


@pytest.mark.platform_teardown
def test_down_leaves_no_process_and_no_port(platform: Settings) -> None:
    healths = Platform(platform).status()
    pids = [pid for h in healths for pid in h.pids]
    ports = [port for s in Platform(platform).services for port in s.ports]
    lambdalake("down")
    left = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert not left, [_process_line(pid) for pid in left]
    assert not [port for port in ports if port_open("127.0.0.1", port)]
    assert not list(platform.run_dir.glob("*.pid"))
    assert lambdalake("status", check=False).returncode == 3
    lambdalake("down")  # a second down is harmless
