"""The platform's MLflow: tracking server and model registry on a SQLite store, artifacts
served by the server itself."""

from __future__ import annotations

from infra.process import ManagedProcess, http_ok
from infra.service import LOCALHOST, Service, tool


class MlflowService(Service):
    """MLflow tracking server and model registry on a SQLite store."""

    name = "mlflow"
    # a first start creates and migrates its SQLite database: 20 s on an idle 2-core machine,
    # over a minute when the machine is busy (a test run beside other work)
    start_timeout = 180.0

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.settings.mlflow_port,)

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.settings.mlflow_port}"

    def processes(self) -> list[ManagedProcess]:
        argv = [
            tool("mlflow"),
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
