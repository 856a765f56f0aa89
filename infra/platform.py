"""The embedded local platform: the services this machine runs (`infra.kafka`,
`infra.mlflow`, `infra.ray`, `infra.airflow`) and the supervised apps (`infra.apps`), started,
checked and stopped as a whole.

`up` is idempotent and all-or-nothing (a failed start stops what this call started and
reports the log tail), `down` stops everything and checks that no port is left listening.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from infra.airflow import AirflowService
from infra.apps import ApiApp, SpeedApp, SupervisedApp
from infra.jvm import ensure_jars
from infra.kafka import KafkaService
from infra.mlflow import MlflowService
from infra.process import port_holder, port_open, wait_until
from infra.ray import RayService
from infra.redis import RedisService
from infra.service import LOCALHOST, Health, Service
from lakehouse.config import Settings
from lakehouse.errors import ServiceError
from lakehouse.jvm import java_binary

ServiceFactory = Callable[[Settings], Service]
# every service the platform can run, in the order `status` lists them
SERVICES: tuple[ServiceFactory, ...] = (KafkaService, RedisService, MlflowService, RayService, AirflowService)


class Platform:
    """The local platform: the services the settings ask this machine to run."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        managed = {
            "kafka": settings.manage_kafka,
            "redis": settings.manage_redis,
            "mlflow": settings.manage_mlflow,
            "ray": settings.manage_ray,
            "airflow": settings.manage_airflow,
        }
        self.services: list[Service] = [
            service for service in (factory(settings) for factory in SERVICES)
            if managed[service.name]
        ]
        self.apps: list[SupervisedApp] = [SpeedApp(settings), ApiApp(settings)]

    def up(self, *, apps: bool = False, echo: Callable[[str], None] = lambda line: None) -> list[Health]:
        """Start every service that is not running, all or nothing; with `apps`, then the
        speed layer and the API (they need a champion model on Ray Serve)."""
        java_binary()  # Maven and Kafka both need it: say how to install it first
        ensure_jars(self.settings.jars_dir)
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
            if wait_until(functools.partial(_port_closed, port), timeout=10) is False
        ]
        if busy:
            raise ServiceError(
                "after stopping, these ports still listen: "
                + ", ".join(f"{name} {port} ({port_holder(port)})" for name, port in busy)
            )


def _port_closed(port: int) -> bool:
    return not port_open(LOCALHOST, port)
