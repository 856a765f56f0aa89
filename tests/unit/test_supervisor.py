"""The platform supervises its apps, tested with real child processes (small Python scripts
written here that crash, exit or hang), never mocks: a crashed app is restarted with capped
exponential backoff and stays in `status` with its state, restart count and last error."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import infra.apps
from infra.platform import Platform
from infra.process import stop_group, wait_until
from infra.service import REPO_ROOT as REPO
from infra.supervisor import Backoff, read_state, write_state
from lakehouse.config import Settings, load_settings
from lakehouse.errors import ServiceError


def _free_port() -> int:
    return _free_ports(1)


def _free_ports(count: int) -> int:
    """The first of `count` consecutive ports free now, below the kernel's ephemeral range.

    The apps' supervisors serve metrics on the ports after the speed layer's, so one free port
    is not enough; and a port the kernel hands out for a client connection (32768 and up) can
    be taken by any other test's connection between picking and binding it."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - count)
        probes = [socket.socket() for _ in range(count)]
        try:
            for offset, probe in enumerate(probes):
                probe.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError(f"no {count} consecutive free ports between 20000 and 32000")


def _settings(tmp_path: Path) -> Settings:
    """A platform of apps only (no services): the speed layer's metrics port, the two
    supervisors' after it and the API's, four consecutive free ports."""
    base = _free_ports(4)
    return load_settings(state_dir=tmp_path / "state", manage_kafka=False, manage_redis=False, manage_mlflow=False,
                         manage_ray=False, manage_airflow=False, speed_metrics_port=base, api_port=base + 3)


def _fake_lambdalake(bin_dir: Path, body: str) -> None:
    """A `lambdalake` console script that runs `body` instead of the real command."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "lambdalake"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    script.chmod(0o755)


POISON = """
    import sys
    sys.stderr.write("Traceback (most recent call last):\\n")
    sys.stderr.write("RecursionError: maximum recursion depth exceeded at offset 41\\n")
    sys.exit(1)
"""


def test_a_crash_looping_app_stays_in_status_with_its_last_error(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_lambdalake(tmp_path / "bin", POISON)
    monkeypatch.setattr(infra.apps, "VENV_BIN", tmp_path / "bin")
    settings = _settings(tmp_path)
    platform = Platform(settings)
    speed = platform.apps[0]
    assert speed.name == "speed"
    speed.backoff = Backoff(initial_s=0.2, factor=2, max_s=1, reset_after_s=10)
    try:
        with pytest.raises(ServiceError, match="RecursionError"):
            platform.start_apps()
        time.sleep(1.5)  # long enough for at least one restart of the crash loop
        listed = {health.service: health for health in Platform(settings).status()}
        assert "speed" in listed, listed  # never omitted
        health = listed["speed"]
        assert not health.healthy
        # a crash loop passes through all three: waiting out its backoff, launched, exiting
        assert health.state in ("restarting", "starting", "running")
        assert health.restarts >= 1
        assert "exit code 1" in health.last_exit
        assert "RecursionError: maximum recursion depth exceeded" in health.last_error
        assert "restart" in health.detail
    finally:
        speed.stop()
    assert not speed.pids()


# --- the supervisor on its own: python -m infra.supervisor, as `up --apps` runs it ----------

def _child(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(body))
    return [sys.executable, str(script)]


def _supervise(tmp_path: Path, command: list[str], *, initial: float = 0.1, factor: float = 2,
               maximum: float = 0.4, reset_after: float = 30, stop_timeout: float = 5,
               metrics_port: int = 0) -> subprocess.Popen[bytes]:
    """Start the supervisor in a session of its own, its output in tmp_path/app.log."""
    with (tmp_path / "app.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "infra.supervisor", "--name", "crashy",
             "--state-file", str(tmp_path / "crashy.state.json"),
             "--metrics-port", str(metrics_port), "--backoff-initial", str(initial),
             "--backoff-factor", str(factor), "--backoff-max", str(maximum),
             "--reset-after", str(reset_after), "--stop-timeout", str(stop_timeout),
             "--", *command],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)


def _state(tmp_path: Path) -> dict[str, Any]:
    return read_state(tmp_path / "crashy.state.json") or {}


def _until(check: Callable[[], bool], timeout: float = 15) -> None:
    assert wait_until(check, timeout=timeout, interval=0.05), "condition not reached in time"


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie its (new) parent has yet to collect."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _stop(supervisor: subprocess.Popen[bytes]) -> None:
    """What `lambdalake down` does: SIGTERM the group, SIGKILL after a timeout."""
    stop_group(supervisor.pid, timeout=15)
    supervisor.wait(timeout=5)


def test_backoff_doubles_up_to_its_cap_and_metrics_show_the_crash_loop(tmp_path: Path) -> None:
    runs = tmp_path / "runs.txt"
    command = _child(tmp_path, f"""
        import sys, time
        with open({str(runs)!r}, "a") as runs:
            runs.write(f"{{time.monotonic()}}\\n")
        sys.exit(3)
    """)
    port = _free_port()
    supervisor = _supervise(tmp_path, command, initial=0.2, factor=2, maximum=0.8,
                            metrics_port=port)
    try:
        _until(lambda: _state(tmp_path).get("restarts", 0) >= 5)
        state = _state(tmp_path)
        assert state["consecutive_failures"] >= 5 and state["last_exit"] == "exit code 3"
        starts = [float(line) for line in runs.read_text().split()]
        gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        # each restart waits its backoff: 0.2, 0.4, 0.8, then capped at 0.8
        for gap, backoff in zip(gaps, [0.2, 0.4, 0.8, 0.8], strict=False):
            assert gap >= backoff, (gaps, backoff)
        assert gaps[3] < 0.8 + 0.7, gaps  # capped, not 1.6
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        restarts = _sample(metrics, 'lambdalake_app_restarts_total{app="crashy"}')
        assert restarts >= 5
        assert _sample(metrics, 'lambdalake_app_consecutive_failures{app="crashy"}') >= 4
        assert _sample(metrics, 'lambdalake_app_last_exit_code{app="crashy"}') == 3
        assert 'lambdalake_app_up{app="crashy"}' in metrics
    finally:
        _stop(supervisor)
    assert _state(tmp_path)["state"] == "stopped"


def _sample(metrics: str, name: str) -> float:
    lines = [line for line in metrics.splitlines() if line.startswith(name + " ")]
    assert lines, f"{name} not in\n{metrics}"
    return float(lines[0].split()[-1])


def test_a_healthy_run_resets_the_backoff_and_a_clean_exit_counts_too(tmp_path: Path) -> None:
    counter = tmp_path / "count"
    command = _child(tmp_path, f"""
        import pathlib, sys, time
        counter = pathlib.Path({str(counter)!r})
        run = int(counter.read_text()) + 1 if counter.exists() else 1
        counter.write_text(str(run))
        if run <= 3:
            sys.exit(1)          # a crash loop: backoff 0.1, 0.2, 0.4
        if run == 4:
            time.sleep(1.2)      # a healthy run (reset after 1 s), then a clean exit
            sys.exit(0)
        time.sleep(60)
    """)
    supervisor = _supervise(tmp_path, command, initial=0.1, maximum=5, reset_after=1.0)
    try:
        _until(lambda: _state(tmp_path).get("restarts", 0) == 3)
        assert _state(tmp_path)["consecutive_failures"] == 3
        _until(lambda: _state(tmp_path).get("restarts", 0) == 4 and _state(tmp_path)["pid"])
        state = _state(tmp_path)
        assert state["consecutive_failures"] == 1, state  # the count started again
        assert state["last_exit"] == "exit code 0" and state["state"] == "running"
    finally:
        _stop(supervisor)


def test_stop_sends_sigterm_then_sigkill_to_an_app_that_ignores_it(tmp_path: Path) -> None:
    command = _child(tmp_path, """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.stderr.write("ignoring SIGTERM\\n"))
        print("hanging", flush=True)
        while True:
            time.sleep(0.05)
    """)
    supervisor = _supervise(tmp_path, command, stop_timeout=1.0)
    _until(lambda: "hanging" in (tmp_path / "app.log").read_text())
    child = _state(tmp_path)["pid"]
    started = time.monotonic()
    _stop(supervisor)
    assert time.monotonic() - started < 10  # the supervisor killed it after 1 s, not down's 15
    assert _gone(child)
    log = (tmp_path / "app.log").read_text()
    assert "ignoring SIGTERM" in log and '"event": "kill"' in log
    state = _state(tmp_path)
    assert state["state"] == "stopped" and state["restarts"] == 0  # a stop is no crash


def test_an_app_killed_by_a_signal_says_which(tmp_path: Path) -> None:
    command = _child(tmp_path, """
        import os, signal, sys
        sys.stderr.write("about to be killed\\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    supervisor = _supervise(tmp_path, command, initial=5, maximum=5)
    try:
        _until(lambda: _state(tmp_path).get("restarts", 0) >= 1)
        state = _state(tmp_path)
        assert state["last_exit"] == "killed by signal SIGKILL" and state["last_exit_code"] == -9
        assert state["last_error"] == ["about to be killed"]
        assert state["state"] == "restarting" and state["next_start_at"] > time.time()
    finally:
        _stop(supervisor)


def test_the_state_file_is_replaced_atomically(tmp_path: Path) -> None:
    path = tmp_path / "x.state.json"
    write_state(path, {"state": "running"})
    write_state(path, {"state": "restarting"})
    assert read_state(path) == {"state": "restarting"}
    assert [p.name for p in tmp_path.iterdir()] == ["x.state.json"]  # no temporary left


# --- the apps on the platform ---------------------------------------------------------

HTTP_APP = """
    import http.server, os, sys
    port = int(sys.argv[sys.argv.index("--metrics-port") + 1]) if "speed" in sys.argv \\
        else int(os.environ["FAKE_API_PORT"])

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    http.server.HTTPServer(("127.0.0.1", port), Ok).serve_forever()
"""


def test_up_apps_supervises_both_apps_and_down_stops_them(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_lambdalake(tmp_path / "bin", HTTP_APP)
    monkeypatch.setattr(infra.apps, "VENV_BIN", tmp_path / "bin")
    settings = _settings(tmp_path)
    monkeypatch.setenv("FAKE_API_PORT", str(settings.api_port))
    platform = Platform(settings)
    try:
        platform.start_apps()
        healths = {h.service: h for h in Platform(settings).status()}
        assert healths["speed"].healthy and healths["api"].healthy, healths
        assert healths["speed"].state == "running" and healths["speed"].restarts == 0
        assert len(healths["speed"].pids) == 2  # the supervisor and the app
        speed, api = platform.apps
        assert api.supervisor_metrics_port == speed.supervisor_metrics_port + 1
        metrics = urllib.request.urlopen(speed.metrics_url, timeout=5).read().decode()
        assert _sample(metrics, 'lambdalake_app_up{app="speed"}') == 1
        # the app dies: the supervisor brings it back, and status shows the restart
        os.kill(healths["speed"].pids[1], signal.SIGKILL)
        _until(lambda: Platform(settings).status()[0].restarts == 1
               and Platform(settings).status()[0].healthy)
        assert "1 restart, last: killed by signal SIGKILL" in Platform(settings).status()[0].detail
        pids = [pid for h in Platform(settings).status() for pid in h.pids]
    finally:
        platform.down()
    assert all(_gone(pid) for pid in pids)
    assert Platform(settings).status() == []  # brought down: no longer part of the platform
    assert not list(settings.run_dir.glob("*.state.json"))


def test_an_app_outliving_its_killed_supervisor_is_shown_and_stopped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_lambdalake(tmp_path / "bin", "import time\nprint('up', flush=True)\ntime.sleep(60)\n")
    monkeypatch.setattr(infra.apps, "VENV_BIN", tmp_path / "bin")
    settings = _settings(tmp_path)
    speed = Platform(settings).apps[0]
    speed.start()
    try:
        _until(lambda: len(speed.pids()) == 2)
        supervisor, app = speed.pids()
        os.kill(supervisor, signal.SIGKILL)
        _until(lambda: speed.supervisor.pid() is None)
        health = {h.service: h for h in Platform(settings).status()}["speed"]
        assert health.state == "down" and not health.healthy
        assert f"unsupervised, pid {app}" in health.detail and health.pids == (app,)
    finally:
        speed.stop()
    assert _gone(app)
