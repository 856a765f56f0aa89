"""Keeps one app of the platform running: `python -m infra.supervisor --name speed ... -- ARGV`.

Why a supervisor process per app, between `lambdalake up --apps` and the app itself:
- `up` is a command that returns; something must stay behind to notice that the speed
  layer or the API died (a poison record, a lost connection) and start it again. A
  supervisor per app keeps each one small and independent: stopping, restarting or
  crashing one app's supervisor never touches the other app, and each fits the platform's
  existing process model (one managed process, one pid file, one log per app).
- The app runs as the supervisor's child **in the supervisor's process group**, so
  `lambdalake down` stops both with one group signal (SIGTERM, then SIGKILL after a
  timeout), and an app left behind by a supervisor that was itself killed is still found
  and stopped through the group (see `infra.apps`).

What it guarantees:
- Restart with capped exponential backoff: the n-th consecutive failure waits
  `min(initial_s * factor**(n-1), max_s)`; a run that lasted `reset_after_s` or longer
  counts as healthy, so its exit starts the count again at 1. Every exit is a failure,
  exit code 0 included: these apps are meant to run until stopped.
- A state file (JSON, written atomically: a temporary file in the same folder, then
  rename) says at every transition what the app is doing: `running`, `restarting` (with
  the backoff and when the next start is due), `stopping`, `stopped`; the restart count;
  the last exit (`exit code 1`, `killed by signal SIGKILL`) and the last lines the app
  wrote to stderr before it. `lambdalake status` reads it; the file is never partially
  written, so a reader sees either the previous state or the next one.
- Prometheus metrics on `--metrics-port` (127.0.0.1): `lambdalake_app_up`,
  `lambdalake_app_restarts_total`, `lambdalake_app_consecutive_failures`,
  `lambdalake_app_backoff_seconds` and `lambdalake_app_last_exit_code`, labelled by app,
  so a crash loop shows on a dashboard as a rising restart count while `up` stays 0.
- SIGTERM or SIGINT: no more restarts; the child is sent SIGTERM and, if it is still
  running after `--stop-timeout`, SIGKILL (with whatever it left in the group).

The app's stdout goes straight to the supervisor's stdout (the app's log); its stderr is
copied there line by line, keeping the last lines in memory for the state file.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.process import group_members, process_start_time
from lakehouse.logs import json_logging

log = logging.getLogger("lambdalake.supervisor")

STATES = ("running", "restarting", "stopping", "stopped")


@dataclass(frozen=True)
class Backoff:
    """Delay before restarting an app that failed `failures` times in a row (≥ 1)."""

    initial_s: float = 1.0
    factor: float = 2.0
    max_s: float = 60.0
    # a run at least this long was healthy: the failure count starts again after it
    reset_after_s: float = 60.0

    def __post_init__(self) -> None:
        if not (0 < self.initial_s <= self.max_s and self.factor >= 1 and self.reset_after_s > 0):
            raise ValueError(f"invalid backoff {self}")

    def delay(self, failures: int) -> float:
        return min(self.max_s, self.initial_s * self.factor ** max(failures - 1, 0))


def describe_exit(returncode: int) -> str:
    """`exit code 1`, or `killed by signal SIGKILL` for a negative Popen return code."""
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = str(-returncode)
    return f"killed by signal {name}"


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Replace `path` with `state` as JSON in one rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(state, handle)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_state(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


class _Metrics:
    def __init__(self, app: str) -> None:
        from prometheus_client import Counter, Gauge

        self.up = Gauge("lambdalake_app_up", "1 while the app's process runs, 0 while it is "
                        "down or waiting to restart.", ["app"]).labels(app)
        self.restarts = Counter("lambdalake_app_restarts", "Times the supervisor restarted "
                                "the app after it exited.", ["app"]).labels(app)
        self.failures = Gauge("lambdalake_app_consecutive_failures", "Exits in a row without "
                              "a healthy run in between (a crash loop keeps it rising).",
                              ["app"]).labels(app)
        self.backoff = Gauge("lambdalake_app_backoff_seconds", "Delay before the pending "
                             "restart (0 while the app runs).", ["app"]).labels(app)
        self.last_exit = Gauge("lambdalake_app_last_exit_code", "Exit code of the app's last "
                               "exit (negative: the signal that killed it).", ["app"]).labels(app)


class Supervisor:
    """Runs `argv` as a child until stopped, restarting it with backoff (see the module)."""

    def __init__(self, name: str, argv: Sequence[str], *, state_path: Path, backoff: Backoff,
                 stop_timeout_s: float = 20.0, metrics_port: int = 0,
                 metrics_host: str = "127.0.0.1", error_lines: int = 10) -> None:
        if not argv:
            raise ValueError("no command to supervise")
        self.name = name
        self.argv = list(argv)
        self.state_path = state_path
        self.backoff = backoff
        self.stop_timeout_s = stop_timeout_s
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=error_lines)
        self._stopping = False
        self._state: dict[str, Any] = {
            "app": name, "state": "running", "supervisor_pid": os.getpid(), "argv": self.argv,
            "pid": None, "pid_start_time": None, "started_at": None, "restarts": 0,
            "consecutive_failures": 0, "backoff_s": None, "next_start_at": None,
            "last_exit": None, "last_exit_code": None, "last_exit_at": None, "last_error": [],
        }
        self._metrics: _Metrics | None = None

    # --- the loop -----------------------------------------------------------------------
    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._request_stop)
        if self.metrics_port:
            from prometheus_client import start_http_server

            self._metrics = _Metrics(self.name)
            try:
                start_http_server(self.metrics_port, addr=self.metrics_host)
            except OSError as exc:
                log.error(json.dumps({"event": "metrics", "app": self.name, "error": (
                    f"cannot serve metrics on {self.metrics_host}:{self.metrics_port}: {exc}; "
                    "free the port or set LAMBDALAKE_APPS_METRICS_PORT")}))
                return 1
        child: subprocess.Popen[bytes] | None = None
        while not self._stopping:
            child, reader = self._spawn()
            started = time.monotonic()
            while child is not None and child.poll() is None and not self._stopping:
                time.sleep(0.1)
            if self._stopping:
                break
            ran_s = time.monotonic() - started
            self._exited(child, reader, ran_s)
            child = None
            self._wait_backoff()
        self._stop_child(child)
        return 0

    def _request_stop(self, signum: int, frame: object) -> None:
        self._stopping = True

    def _spawn(self) -> tuple[subprocess.Popen[bytes] | None, threading.Thread | None]:
        self._stderr_tail.clear()
        log.info(json.dumps({"event": "start", "app": self.name, "argv": self.argv,
                             "restarts": self._state["restarts"]}))
        try:
            child = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except OSError as exc:  # a missing or non-executable command fails like a crash
            self._stderr_tail.append(f"cannot run {self.argv[0]!r}: {exc}")
            self._update(state="running", pid=None, pid_start_time=None, started_at=time.time())
            return None, None
        reader = threading.Thread(target=self._copy_stderr, args=(child,), daemon=True,
                                  name=f"{self.name}-stderr")
        reader.start()
        self._update(state="running", pid=child.pid, pid_start_time=process_start_time(child.pid),
                     started_at=time.time(), backoff_s=None, next_start_at=None)
        if self._metrics:
            self._metrics.up.set(1)
            self._metrics.backoff.set(0)
        return child, reader

    def _copy_stderr(self, child: subprocess.Popen[bytes]) -> None:
        assert child.stderr is not None
        for line in iter(child.stderr.readline, b""):
            os.write(2, line)  # O_APPEND: one write per line keeps lines whole in the log
            self._stderr_tail.append(line.decode("utf-8", "replace").rstrip("\n")[:500])
        child.stderr.close()

    def _exited(self, child: subprocess.Popen[bytes] | None, reader: threading.Thread | None,
                ran_s: float) -> None:
        if reader is not None:
            # the last lines (a traceback) are written just before exit; a grandchild that
            # kept the pipe open must not hold the restart up
            reader.join(timeout=1.0)
        self._reap_leftovers()
        code = child.returncode if child is not None else 127
        healthy_run = ran_s >= self.backoff.reset_after_s
        failures = 1 if healthy_run else self._state["consecutive_failures"] + 1
        delay = self.backoff.delay(failures)
        what = describe_exit(code) if child is not None else "could not start"
        self._update(state="restarting", pid=None, pid_start_time=None,
                     restarts=self._state["restarts"] + 1, consecutive_failures=failures,
                     backoff_s=delay, next_start_at=time.time() + delay, last_exit=what,
                     last_exit_code=code, last_exit_at=time.time(),
                     last_error=list(self._stderr_tail))
        log.warning(json.dumps({"event": "exit", "app": self.name, "exit": what,
                                "ran_s": round(ran_s, 1), "consecutive_failures": failures,
                                "restart_in_s": delay, "restarts": self._state["restarts"]}))
        if self._metrics:
            self._metrics.up.set(0)
            self._metrics.restarts.inc()
            self._metrics.failures.set(failures)
            self._metrics.backoff.set(delay)
            self._metrics.last_exit.set(code)

    def _wait_backoff(self) -> None:
        due = time.monotonic() + float(self._state["backoff_s"])
        while not self._stopping and time.monotonic() < due:
            time.sleep(min(0.1, max(due - time.monotonic(), 0)))

    def _stop_child(self, child: subprocess.Popen[bytes] | None) -> None:
        self._update(state="stopping", backoff_s=None, next_start_at=None)
        if child is not None and child.poll() is None:
            log.info(json.dumps({"event": "stop", "app": self.name, "pid": child.pid}))
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning(json.dumps({"event": "kill", "app": self.name, "pid": child.pid,
                                        "after_s": self.stop_timeout_s}))
                child.kill()
                child.wait()
        self._reap_leftovers(grace_s=min(self.stop_timeout_s, 5.0))
        self._update(state="stopped", pid=None, pid_start_time=None)
        if self._metrics:
            self._metrics.up.set(0)

    def _reap_leftovers(self, grace_s: float = 2.0) -> None:
        """Stop what the app left in our process group (its own children): a leftover
        could hold the app's port and make every restart fail. Only when we lead the group
        (as `lambdalake up` starts us): otherwise the group is someone else's."""
        me = os.getpid()
        if os.getpgid(0) != me:
            return
        leftovers = [pid for pid in group_members(me) if pid != me]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in leftovers:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                leftovers = [pid for pid in group_members(me) if pid != me]
                if not leftovers:
                    return
                time.sleep(0.1)

    def _update(self, **changes: Any) -> None:
        self._state.update(changes, updated_at=time.time())
        write_state(self.state_path, self._state)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.supervisor",
                                     description="Run a command, restarting it with backoff.")
    parser.add_argument("--name", required=True, help="the app's name (metrics label, logs)")
    parser.add_argument("--state-file", required=True, type=Path)
    parser.add_argument("--metrics-port", type=int, default=0, help="0: no metrics endpoint")
    parser.add_argument("--metrics-host", default="127.0.0.1")
    parser.add_argument("--backoff-initial", type=float, default=Backoff.initial_s)
    parser.add_argument("--backoff-factor", type=float, default=Backoff.factor)
    parser.add_argument("--backoff-max", type=float, default=Backoff.max_s)
    parser.add_argument("--reset-after", type=float, default=Backoff.reset_after_s,
                        help="seconds of running after which a run counts as healthy")
    parser.add_argument("--stop-timeout", type=float, default=20.0,
                        help="seconds between SIGTERM and SIGKILL when stopping the app")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to supervise: append -- COMMAND [ARGS...]")
    json_logging("INFO")
    supervisor = Supervisor(
        args.name, command, state_path=args.state_file,
        backoff=Backoff(args.backoff_initial, args.backoff_factor, args.backoff_max,
                        args.reset_after),
        stop_timeout_s=args.stop_timeout, metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
