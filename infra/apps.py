"""The platform's own long-running applications, managed like its services: the speed layer
(`lambdalake speed run`) and the HTTP API (`lambdalake serve`).

They need a champion model on Ray Serve, so `lambdalake up` starts them only when asked
(`lambdalake up --apps`, which `make demo` uses after training); `lambdalake down` always
stops them first. Each keeps a pid file under <state_dir>/run and a log under
<state_dir>/logs like any service.
"""

from __future__ import annotations

from infra.process import ManagedProcess, http_ok
from infra.services import LOCALHOST, REPO_ROOT, VENV_BIN, Service


class _App(Service):
    """A lambdalake command run as a service: it keeps no state of its own."""

    @property
    def home(self):  # type: ignore[no-untyped-def]
        return REPO_ROOT

    def prepare(self) -> None:
        pass


class SpeedApp(_App):
    name = "speed"
    start_timeout = 120.0

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.settings.speed_metrics_port,)

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.settings.speed_metrics_port}/metrics"

    def processes(self) -> list[ManagedProcess]:
        return [self.process("speed", [str(VENV_BIN / "lambdalake"), "speed", "run",
                                       "--metrics-port", str(self.settings.speed_metrics_port)])]

    def ready(self) -> bool:
        return http_ok(self.url, timeout=3)


class ApiApp(_App):
    name = "api"
    start_timeout = 180.0

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.settings.api_port,)

    @property
    def url(self) -> str:
        return f"http://{self.settings.api_host}:{self.settings.api_port}"

    def processes(self) -> list[ManagedProcess]:
        return [self.process("api", [str(VENV_BIN / "lambdalake"), "serve"])]

    def ready(self) -> bool:
        return http_ok(f"{self.url}/readyz", timeout=3)

