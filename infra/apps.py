"""The platform's own long-running applications, managed like its services: the speed layer
(`lambdalake speed run`) and the HTTP API (`lambdalake serve`).

They need a champion model on Ray Serve, so `lambdalake up` starts them only when asked
(`lambdalake up --apps`, which `make demo` uses after training); `lambdalake down` always
stops them first.

Each app runs under its own supervisor (`infra.supervisor`, see there why), which restarts
it with capped exponential backoff when it dies, records its state in
`<state_dir>/run/<app>.state.json` and serves its restart and up/down metrics on a port of
its own: the speed layer's supervisor on `LAMBDALAKE_APPS_METRICS_PORT` (empty:
`LAMBDALAKE_SPEED_METRICS_PORT` + 1), the API's on the next port. The supervisor is the
managed process (pid file `<state_dir>/run/<app>.pid`, log `<state_dir>/logs/<app>.log`,
which also holds the app's output); the app is its child, in its process group.

An app brought up stays in `status` until `down` (or `stop`) takes it out: running,
restarting (with its restart count and last error) or down (its supervisor is gone).
"""

from __future__ import annotations

import sys
import time
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.process import ManagedProcess, http_ok, is_running, stop_group, wait_until
from infra.service import LOCALHOST, REPO_ROOT, VENV_BIN, Health, Service
from infra.supervisor import Backoff, read_state
from lakehouse.errors import ServiceError


@dataclass(frozen=True)
class AppHealth(Health):
    """A service's health plus what the supervisor knows: `state` is running, starting,
    restarting, stopping, stopped or down (no supervisor); `last_exit` and `last_error`
    (the app's last stderr lines) describe its latest exit."""

    state: str = "stopped"
    restarts: int = 0
    last_exit: str = ""
    last_error: str = ""


class SupervisedApp(Service):
    """A lambdalake command run under a supervisor; it keeps no state of its own."""

    # which of the two supervisor metrics ports is this app's
    metrics_port_index: int = 0
    backoff: Backoff = Backoff()
    # SIGTERM → SIGKILL: the speed layer finishes its micro-batch first
    stop_timeout_s: float = 20.0

    @property
    def home(self) -> Path:
        return REPO_ROOT

    def prepare(self) -> None:
        pass

    @abstractmethod
    def command(self) -> list[str]:
        """The app's own command line, which the supervisor runs."""

    @property
    @abstractmethod
    def app_port(self) -> int: ...

    @property
    def supervisor_metrics_port(self) -> int:
        base = self.settings.apps_metrics_port or self.settings.speed_metrics_port + 1
        return base + self.metrics_port_index

    @property
    def metrics_url(self) -> str:
        return f"http://{LOCALHOST}:{self.supervisor_metrics_port}/metrics"

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.app_port, self.supervisor_metrics_port)

    @property
    def state_path(self) -> Path:
        return self.settings.run_dir / f"{self.name}.state.json"

    def processes(self) -> list[ManagedProcess]:
        backoff = self.backoff
        return [self.process(self.name, [
            sys.executable, "-m", "infra.supervisor",
            "--name", self.name,
            "--state-file", str(self.state_path),
            "--metrics-port", str(self.supervisor_metrics_port),
            "--backoff-initial", str(backoff.initial_s),
            "--backoff-factor", str(backoff.factor),
            "--backoff-max", str(backoff.max_s),
            "--reset-after", str(backoff.reset_after_s),
            "--stop-timeout", str(self.stop_timeout_s),
            "--", *self.command(),
        ])]

    # --- what runs --------------------------------------------------------------------
    @property
    def supervisor(self) -> ManagedProcess:
        return self.processes()[0]

    def state(self) -> dict[str, Any] | None:
        """The supervisor's last recorded state, None where it never wrote one."""
        return read_state(self.state_path)

    def _child(self, state: dict[str, Any] | None) -> int | None:
        if state is None or not is_running(state.get("pid"), state.get("pid_start_time")):
            return None
        return int(state["pid"])

    def pids(self) -> tuple[int, ...]:
        """The supervisor's pid, then the app's, of those that run."""
        supervisor, child = self.supervisor.pid(), self._child(self.state())
        return tuple(pid for pid in (supervisor, child) if pid is not None)

    def running(self) -> bool:
        """Supervised: its supervisor runs (the app itself may be between restarts)."""
        return self.supervisor.pid() is not None

    def health(self) -> AppHealth:
        state = self.state()
        supervisor, child = self.supervisor.pid(), self._child(state)
        pids = tuple(pid for pid in (supervisor, child) if pid is not None)
        if state is None and supervisor is None:
            return AppHealth(self.name, False, self.url, "stopped", pids)
        state = state or {}
        restarts = int(state.get("restarts", 0))
        last_exit = state.get("last_exit") or ""
        known: dict[str, Any] = dict(restarts=restarts, last_exit=last_exit,
                                     last_error="\n".join(state.get("last_error") or []))
        history = f"{restarts} restart{'s' * (restarts != 1)}, last: {last_exit}" if restarts else ""
        if supervisor is None:
            detail = "down: its supervisor is not running"
            if child is not None:
                detail += f" (the app runs unsupervised, pid {child})"
            return AppHealth(self.name, False, self.url, _join(detail, history), pids,
                             state="down", **known)
        recorded = state.get("state", "starting")
        if recorded == "restarting":
            due = max(0.0, float(state.get("next_start_at") or 0) - time.time())
            failures = int(state.get("consecutive_failures", 0))
            detail = (f"restarting in {due:.0f}s ({last_exit}; {restarts} "
                      f"restart{'s' * (restarts != 1)}, {failures} in a row)")
            return AppHealth(self.name, False, self.url, detail, pids, state="restarting", **known)
        if recorded == "running" and child is not None:
            if self.ready():
                return AppHealth(self.name, True, self.url, _join("healthy", history), pids,
                                 state="running", **known)
            return AppHealth(self.name, False, self.url, _join("not answering", history), pids,
                             state="running", **known)
        if recorded in ("stopping", "stopped"):
            return AppHealth(self.name, False, self.url, recorded, pids, state=recorded, **known)
        # the app just exited and the supervisor has not recorded it yet, or starts it
        return AppHealth(self.name, False, self.url, _join("starting", history), pids,
                         state="starting", **known)

    # --- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        # a state left by an earlier supervisor describes a run that is over
        self.state_path.unlink(missing_ok=True)
        super().start()

    def wait_ready(self) -> None:
        """Ready, or fail at the app's first exit with its exit and last error (its
        supervisor keeps restarting it: `status` shows it, `down` stops it)."""
        def ready_or_died() -> bool:
            state = self.state() or {}
            if state.get("restarts", 0) > 0:
                raise ServiceError(self._failure(
                    f"exited during start-up ({state.get('last_exit')}); its supervisor keeps "
                    f"restarting it with backoff (at most {self.backoff.max_s:g}s apart): "
                    f"`lambdalake status` shows it, `lambdalake down` stops it. Its last "
                    f"error:\n" + "\n".join(state.get("last_error") or [])))
            if self.supervisor.pid() is None:
                raise ServiceError(self._failure("its supervisor exited during start-up"))
            return self.ready()

        if not wait_until(ready_or_died, timeout=self.start_timeout, interval=0.5):
            raise ServiceError(self._failure(f"not ready after {self.start_timeout:.0f}s"))

    def stop(self) -> None:
        """SIGTERM the supervisor and the app (one process group), SIGKILL what is left
        after the timeout; an app that outlived a killed supervisor is stopped through its
        group too. The app then leaves `status`."""
        self.supervisor.stop(timeout=self.stop_timeout_s + 10)
        state = self.state()
        if state is not None and self._child(state) is not None:
            stop_group(int(state["supervisor_pid"]), timeout=self.stop_timeout_s)
        self.state_path.unlink(missing_ok=True)


def _join(detail: str, history: str) -> str:
    return f"{detail} ({history})" if history else detail


class SpeedApp(SupervisedApp):
    name = "speed"
    start_timeout = 120.0
    metrics_port_index = 0

    @property
    def app_port(self) -> int:
        return self.settings.speed_metrics_port

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.settings.speed_metrics_port}/metrics"

    def command(self) -> list[str]:
        return [str(VENV_BIN / "lambdalake"), "speed", "run",
                "--metrics-port", str(self.settings.speed_metrics_port)]

    def ready(self) -> bool:
        return http_ok(self.url, timeout=3)


class ApiApp(SupervisedApp):
    name = "api"
    start_timeout = 180.0
    metrics_port_index = 1

    @property
    def app_port(self) -> int:
        return self.settings.api_port

    @property
    def url(self) -> str:
        return f"http://{self.settings.api_host}:{self.settings.api_port}"

    def command(self) -> list[str]:
        return [str(VENV_BIN / "lambdalake"), "serve"]

    def ready(self) -> bool:
        return http_ok(f"{self.url}/readyz", timeout=3)
