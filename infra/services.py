"""The services of the embedded local platform and their lifecycle.

One class per service (Kafka, MLflow, Ray, Airflow), each knowing how to prepare its state,
which processes to start, which ports it needs and how to tell it is healthy. `Platform`
starts, checks and stops them as a whole: `up` is idempotent and all-or-nothing (a failed
start stops what this call started and reports the log tail), `down` stops everything and
checks that no port is left listening.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import uuid
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from infra import jvm
from infra.process import ManagedProcess, http_ok, port_holder, port_open, wait_until
from lakehouse.config import Settings
from lakehouse.errors import ServiceError
from lakehouse.serve import ray_local_env

LOCALHOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
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


class KafkaService(Service):
    """A single-node Apache Kafka broker (KRaft: broker and controller in one JVM)."""

    name = "kafka"
    wave = 0

    @property
    def controller_port(self) -> int:
        return self.settings.kafka_port + 1

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.settings.kafka_port, self.controller_port)

    @property
    def url(self) -> str:
        return f"kafka://{LOCALHOST}:{self.settings.kafka_port}"

    def processes(self) -> list[ManagedProcess]:
        java = [
            jvm.java_binary(),
            f"-Xmx{self.settings.kafka_heap}",
            f"-Xms{self.settings.kafka_heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            "-cp",
            jvm.kafka_classpath(self.settings.jars_dir),
        ]
        return [self.process("kafka", [*java, "kafka.Kafka", str(self.home / "server.properties")])]

    def prepare(self) -> None:
        super().prepare()
        port, controller = self.settings.kafka_port, self.controller_port
        data = self.home / "data"
        (self.home / "server.properties").write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@{LOCALHOST}:{controller}",
                    f"listeners=PLAINTEXT://{LOCALHOST}:{port},CONTROLLER://{LOCALHOST}:{controller}",
                    f"advertised.listeners=PLAINTEXT://{LOCALHOST}:{port}",
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                    "inter.broker.listener.name=PLAINTEXT",
                    f"log.dirs={data}",
                    f"num.partitions={self.settings.kafka_partitions}",
                    "offsets.topic.replication.factor=1",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    # topics are created deliberately (lambdalake topics), never by a typo
                    "auto.create.topics.enable=false",
                    # the platform keeps history in bronze; Kafka keeps a week as a buffer
                    "log.retention.hours=168",
                    "num.network.threads=2",
                    "num.io.threads=4",
                    "",
                ]
            )
        )
        (self.home / "log4j2.properties").write_text(
            "\n".join(
                [
                    "status = warn",
                    "appender.out.type = Console",
                    "appender.out.name = OUT",
                    "appender.out.layout.type = PatternLayout",
                    "appender.out.layout.pattern = [%d] %p %m (%c)%n",
                    "rootLogger.level = WARN",
                    "rootLogger.appenderRef.out.ref = OUT",
                    "logger.server.name = kafka.server.KafkaRaftServer",
                    "logger.server.level = INFO",
                    "",
                ]
            )
        )
        if not (data / "meta.properties").exists():
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            result = subprocess.run(
                [
                    jvm.java_binary(),
                    "-Xmx256m",
                    f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
                    "-cp",
                    jvm.kafka_classpath(self.settings.jars_dir),
                    "kafka.tools.StorageTool",
                    "format",
                    # one token: a random id may start with "-", which would read as an option
                    f"--cluster-id={cluster_id}",
                    "-c",
                    str(self.home / "server.properties"),
                ],
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                raise ServiceError(f"kafka: formatting {data} failed:\n{result.stdout}{result.stderr}")

    def ready(self) -> bool:
        if not port_open(LOCALHOST, self.settings.kafka_port):
            return False
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        from lakehouse.streams import kafka_client_config

        try:
            admin = KafkaAdminClient(  # the broker this platform started, whatever else is listed
                **{**kafka_client_config(self.settings),
                   "bootstrap_servers": [f"{LOCALHOST}:{self.settings.kafka_port}"]},
                request_timeout_ms=3000,
                client_id="lambdalake-health",
            )
        except (KafkaError, OSError):
            return False
        try:
            admin.list_topics()
            return True
        except (KafkaError, OSError):
            return False
        finally:
            admin.close()


class MlflowService(Service):
    """MLflow tracking server and model registry on a SQLite store."""

    name = "mlflow"

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.settings.mlflow_port,)

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.settings.mlflow_port}"

    def processes(self) -> list[ManagedProcess]:
        argv = [
            _tool("mlflow"),
            "server",
            "--host", LOCALHOST,
            "--port", str(self.settings.mlflow_port),
            "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.home / 'mlflow.db'}",
            "--artifacts-destination", str(self.home / "artifacts"),
            "--serve-artifacts",
        ]
        # the job runner (GenAI evaluation jobs) forks ~8 consumers of ~170 MB each; not needed
        env = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        return [self.process("mlflow", argv, env)]

    def ready(self) -> bool:
        return http_ok(f"{self.url}/health")


class RayService(Service):
    """A local Ray head (object store capped) with Ray Serve's HTTP proxy started."""

    name = "ray"
    start_timeout = 90.0
    # Ray's raylet gives its agents a fixed 15 s to start (ray-project/ray#65983); on two
    # busy cores they can miss it, so Ray starts before the Python-heavy services.
    wave = 0

    @property
    def gcs_port(self) -> int:
        return int(self.settings.ray_address.rsplit(":", 1)[1])

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.gcs_port, self.settings.serve_http_port)

    @property
    def url(self) -> str:
        return f"ray://{self.settings.ray_address} (Serve http://{LOCALHOST}:{self.settings.serve_http_port})"

    def _env(self) -> dict[str, str]:
        return ray_local_env(self.settings)

    def processes(self) -> list[ManagedProcess]:
        port = self.gcs_port
        argv = [
            _tool("ray"),
            "start",
            "--head",
            "--block",
            f"--node-ip-address={LOCALHOST}",
            f"--port={port}",
            # side ports derived from the GCS port so a second platform (tests) can coexist
            f"--ray-client-server-port={port + 1}",
            f"--dashboard-agent-listen-port={port + 2}",
            f"--node-manager-port={port + 3}",
            f"--object-manager-port={port + 4}",
            f"--min-worker-port={port + 100}",
            f"--max-worker-port={port + 400}",
            f"--object-store-memory={self.settings.ray_object_store_memory_mb * 1024 * 1024}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={self._temp_dir()}",
        ]
        return [self.process("ray", argv, self._env())]

    def _temp_dir(self) -> Path:
        # Ray's socket paths must stay short (AF_UNIX limit): keep it near the root
        return Path("/tmp") / f"lambdalake-ray-{self.gcs_port}"

    def _serve_proxy_answers(self) -> bool:
        # /-/healthz says 503 until an application is deployed; any answer means the proxy is up
        return http_ok(f"http://{LOCALHOST}:{self.settings.serve_http_port}/-/healthz", any_status=True)

    def ready(self) -> bool:
        return port_open(LOCALHOST, self.gcs_port) and self._serve_proxy_answers()

    def wait_ready(self) -> None:
        if not wait_until(lambda: port_open(LOCALHOST, self.gcs_port), timeout=self.start_timeout):
            raise ServiceError(self._failure("the Ray head did not open its GCS port"))
        if not self._serve_proxy_answers():
            self._start_serve()
        super().wait_ready()

    def _start_serve(self) -> None:
        result = subprocess.run(
            [
                _tool("serve"),
                "start",
                f"--address={self.settings.ray_address}",
                f"--http-host={LOCALHOST}",
                f"--http-port={self.settings.serve_http_port}",
            ],
            capture_output=True,
            text=True,
            env={**os.environ, **self._env()},
            timeout=120,
        )
        if result.returncode != 0:
            raise ServiceError(self._failure(f"`serve start` failed:\n{result.stderr[-2000:]}"))


ServiceFactory = Callable[[Settings], Service]


def _all_services() -> list[ServiceFactory]:
    from infra.airflow import AirflowService

    return [KafkaService, MlflowService, RayService, AirflowService]


class Platform:
    """The local platform: the services the settings ask this machine to run."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        managed = {
            "kafka": settings.manage_kafka,
            "mlflow": settings.manage_mlflow,
            "ray": settings.manage_ray,
            "airflow": settings.manage_airflow,
        }
        self.services: list[Service] = [
            service for service in (factory(settings) for factory in _all_services())
            if managed[service.name]
        ]
        from infra.apps import ApiApp, SpeedApp

        self.apps: list[Service] = [SpeedApp(settings), ApiApp(settings)]

    def up(self, *, apps: bool = False, echo: Callable[[str], None] = lambda line: None) -> list[Health]:
        """Start every service that is not running, all or nothing; with `apps`, then the
        speed layer and the API (they need a champion model on Ray Serve)."""
        jvm.java_binary()  # Maven and Kafka both need it: say how to install it first
        jvm.ensure_jars(self.settings.jars_dir)
        started: list[Service] = []
        try:
            to_start = []
            for service in self.services:
                if service.running():
                    echo(f"{service.name}: already running")
                    service.wait_ready()
                    continue
                service.stop()  # clear half-started leftovers (a process of several died)
                self._check_ports_free(service)
                to_start.append(service)
            for wave in sorted({service.wave for service in to_start}):
                batch = [service for service in to_start if service.wave == wave]
                for service in batch:
                    echo(f"{service.name}: starting")
                    service.start()
                    started.append(service)
                for service in batch:
                    service.wait_ready()
                    echo(f"{service.name}: ready at {service.url}")
        except BaseException:
            for service in reversed(started):
                service.stop()
            raise
        if apps:
            self.start_apps(echo=echo)
        return self.status()

    def start_apps(self, *, echo: Callable[[str], None] = lambda line: None) -> None:
        """Start the speed layer and the API (each only if not running)."""
        for app in self.apps:
            if app.running():
                echo(f"{app.name}: already running")
                continue
            app.stop()
            self._check_ports_free(app)
            echo(f"{app.name}: starting")
            app.start()
            app.wait_ready()
            echo(f"{app.name}: ready at {app.url}")

    def _check_ports_free(self, service: Service) -> None:
        for port in service.ports:
            if port_open(LOCALHOST, port):
                raise ServiceError(
                    f"{service.name}: port {port} is already in use by {port_holder(port)}. "
                    f"Stop that process, or give lambdalake other ports (see the config table "
                    f"in README.md, e.g. LAMBDALAKE_{service.name.upper()}_PORT)."
                )

    def status(self) -> list[Health]:
        """Every service, and the apps that run."""
        # an app with a state file is supervised (maybe down or restarting): always listed
        return [s.health() for s in self.services] + [a.health() for a in self.apps
                                                     if a.pids() or a.state_path.exists()]

    def down(self, *, echo: Callable[[str], None] = lambda line: None) -> None:
        """Stop every service; raise if one of our ports still listens afterwards."""
        for app in self.apps:  # they use the services: stop them first
            if app.pids():
                echo(f"{app.name}: stopping")
                app.stop()
        running = [service for service in self.services if service.pids()]
        for service in running:
            echo(f"{service.name}: stopping")
        with ThreadPoolExecutor(max_workers=len(self.services) or 1) as pool:
            list(pool.map(lambda service: service.stop(), self.services))
        busy = [
            (s.name, port) for s in [*self.apps, *self.services] for port in s.ports
            if wait_until(lambda port=port: not port_open(LOCALHOST, port), timeout=10) is False
        ]
        if busy:
            raise ServiceError(
                "after stopping, these ports still listen: "
                + ", ".join(f"{name} {port} ({port_holder(port)})" for name, port in busy)
            )
