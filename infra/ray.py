"""The platform's Ray: a local Ray head (object store capped, side ports derived from the GCS
port) with Ray Serve's HTTP proxy started, in the environment `lakehouse.serve` gives local
Ray (`ray_local_env`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from infra.process import ManagedProcess, http_ok, port_open, wait_until
from infra.service import LOCALHOST, Service, tool
from lakehouse.errors import ServiceError
from lakehouse.serve import ray_local_env


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
            tool("ray"),
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
                tool("serve"),
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
