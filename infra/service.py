"""What a local service is: `Service` (its processes, ports, readiness, start and stop),
its `Health`, and where its tools are (`tool`, `VENV_BIN`, `REPO_ROOT`, `LOCALHOST`).

Each service of the embedded platform is one module built on this one (`infra.kafka`,
`infra.mlflow`, `infra.ray`, `infra.airflow`, the supervised apps in `infra.apps`);
`infra.platform` composes them.
"""

from __future__ import annotations

import shutil
import sys
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from infra.process import ManagedProcess, wait_until
from lakehouse.config import Settings
from lakehouse.errors import ServiceError

LOCALHOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A console script of the running environment (airflow, mlflow, ray)."""
    local = VENV_BIN / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise ServiceError(f"`{name}` is not installed in this environment: run `make install`")
    return found


@dataclass(frozen=True)
class Health:
    service: str
    healthy: bool
    url: str
    detail: str
    pids: tuple[int, ...] = ()


class Service(ABC):
    """A local service made of one or more managed processes."""

    name: str
    start_timeout: float = 60.0
    # Services of a lower wave are started and ready before the next wave starts.
    wave: int = 1

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def home(self) -> Path:
        return self.settings.state_path / self.name

    def process(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> ManagedProcess:
        return ManagedProcess(
            name=name,
            argv=argv,
            run_dir=self.settings.run_dir,
            log_path=self.settings.logs_dir / f"{name}.log",
            env=env or {},
            cwd=self.home,
        )

    @abstractmethod
    def processes(self) -> list[ManagedProcess]:
        """The processes of this service, in start order."""

    @property
    @abstractmethod
    def ports(self) -> tuple[int, ...]:
        """Local TCP ports the service listens on."""

    @property
    @abstractmethod
    def url(self) -> str: ...

    @abstractmethod
    def ready(self) -> bool:
        """True once the service answers requests."""

    def prepare(self) -> None:
        """Create state and config before the first process starts (idempotent)."""
        self.home.mkdir(parents=True, exist_ok=True)

    def pids(self) -> tuple[int, ...]:
        return tuple(p for p in (proc.pid() for proc in self.processes()) if p is not None)

    def running(self) -> bool:
        return len(self.pids()) == len(self.processes())

    def health(self) -> Health:
        pids = self.pids()
        if not pids:
            return Health(self.name, False, self.url, "stopped")
        if len(pids) < len(self.processes()):
            return Health(self.name, False, self.url, "some processes died", pids)
        if not self.ready():
            return Health(self.name, False, self.url, "not answering", pids)
        return Health(self.name, True, self.url, "healthy", pids)

    def start(self) -> None:
        self.prepare()
        for process in self.processes():
            if process.pid() is None:
                process.start()

    def wait_ready(self) -> None:
        def ready_or_died() -> bool:
            dead = [p.name for p in self.processes() if p.pid() is None]
            if dead:
                raise ServiceError(self._failure(f"{', '.join(dead)} exited during start-up"))
            return self.ready()

        if not wait_until(ready_or_died, timeout=self.start_timeout, interval=0.5):
            raise ServiceError(self._failure(f"not ready after {self.start_timeout:.0f}s"))

    def _failure(self, what: str) -> str:
        tails = "\n".join(
            f"--- {p.log_path} (last lines)\n{p.log_tail()}" for p in self.processes()
        )
        return f"{self.name}: {what}. Logs:\n{tails}"

    def stop(self) -> None:
        """Stop all processes at once: each waits for its own graceful shutdown."""
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda process: process.stop(), self.processes()))
