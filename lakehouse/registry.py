"""The MLflow model registry, the one place the layers meet over models: versions,
aliases, signed bundles.

Each training run registers a new version of `settings.model_name` whose source is the
signed bundle logged under the run's `model/` artifacts. Two aliases say what a version is
for: `champion` (what the speed layer and /predict score with) and `challenger` (the newest
version that did not beat the champion on the same holdout). Which alias a new version gets
is the batch layer's decision (`batch.promotion.decide`).

Every alias move goes through `move_alias`, which writes one JSON line to the
`lambdalake.audit` logger: model, alias, version, the version it pointed at before, who and
why.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import socket
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lakehouse.errors import ServiceError

if TYPE_CHECKING:
    from mlflow import MlflowClient

CHAMPION, CHALLENGER = "champion", "challenger"
BUNDLE_ARTIFACT_PATH = "model"

audit = logging.getLogger("lambdalake.audit")


def _redacted(text: str) -> str:
    """Text with the user info of any URL in it (`//user:password@`) left out."""
    return re.sub(r"//[^/@\s]+@", "//***@", text)


def _unreachable(mlflow: MlflowClient, what: str, exc: BaseException) -> ServiceError:
    """The ServiceError for an MLflow call that failed (MLflow down, or answering an error)."""
    uri = _redacted(str(getattr(mlflow, "tracking_uri", "") or "(no tracking URI)"))
    why = _redacted((str(exc).strip().splitlines() or [type(exc).__name__])[0])
    return ServiceError(f"cannot {what} in MLflow at {uri} ({why}): check that MLflow is up "
                        "(`lambdalake up`) and that LAMBDALAKE_MLFLOW_TRACKING_URI names it")


def client(tracking_uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def version_by_alias(mlflow: MlflowClient, name: str, alias: str) -> Any | None:
    """The model version an alias points at, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise _unreachable(mlflow, f"read alias {alias!r} of model {name!r}", exc) from exc
    except OSError as exc:
        raise _unreachable(mlflow, f"read alias {alias!r} of model {name!r}", exc) from exc


def current_actor() -> str:
    """Who is acting, when a caller names nobody: the OS user and host of this process."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def alias_move_record(model: str, alias: str, version: int, previous: int | None, *,
                      who: str, why: str, **context: str) -> dict[str, Any]:
    """The audit record of one alias move (a JSON object)."""
    return {"event": "model_alias_moved", "model": model, "alias": alias, "version": version,
            "previous_version": previous, "who": who, "why": why,
            "at": datetime.now(UTC).isoformat(), **context}


def move_alias(mlflow: MlflowClient, name: str, alias: str, version: int | str, *, why: str,
               who: str | None = None, **context: str) -> dict[str, Any]:
    """Point `alias` of model `name` at `version`, and write the move to the audit log.
    The one way aliases move; returns the audit record."""
    from mlflow.exceptions import MlflowException

    before = version_by_alias(mlflow, name, alias)
    try:
        mlflow.set_registered_model_alias(name, alias, str(version))
    except (MlflowException, OSError) as exc:
        raise _unreachable(mlflow, f"point alias {alias!r} of model {name!r} at v{version}",
                           exc) from exc
    record = alias_move_record(name, alias, int(version), None if before is None else int(before.version),
                               who=who or current_actor(), why=why, **context)
    audit.info(json.dumps(record))
    return record


def download_bundle(mlflow: MlflowClient, version: Any, into: Path | None = None) -> Path:
    """The bundle directory of a model version, downloaded (not yet verified)."""
    import mlflow.artifacts as artifacts

    destination = into or Path(tempfile.mkdtemp(prefix="lambdalake-model-"))
    try:
        local = artifacts.download_artifacts(
            run_id=version.run_id, artifact_path=BUNDLE_ARTIFACT_PATH, dst_path=str(destination),
            tracking_uri=mlflow.tracking_uri)
    except Exception as exc:  # noqa: BLE001 - any transport error means the same to callers
        raise ServiceError(_redacted(f"cannot download model {version.name} v{version.version} "
                                     f"from MLflow at {mlflow.tracking_uri}: {exc}")) from exc
    return Path(local)


def register(mlflow: MlflowClient, name: str, run_id: str, tags: dict[str, str],
             description: str) -> Any:
    """A new version of `name` (created if missing) for the bundle of an MLflow run."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow.create_registered_model(
            name, description="lambdalake scoring model: signed bundles (torch + ONNX)")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise _unreachable(mlflow, f"create model {name!r}", exc) from exc
    except OSError as exc:
        raise _unreachable(mlflow, f"create model {name!r}", exc) from exc
    try:
        source = f"{mlflow.get_run(run_id).info.artifact_uri}/{BUNDLE_ARTIFACT_PATH}"
        return mlflow.create_model_version(name, source=source, run_id=run_id, tags=tags,
                                           description=description)
    except (MlflowException, OSError) as exc:
        raise _unreachable(mlflow, f"register run {run_id} as a version of model {name!r}",
                           exc) from exc


def publish_bundle(mlflow: MlflowClient, name: str, run_id: str, bundle_dir: Path, *,
                   tags: dict[str, str], description: str, alias: str | None = None,
                   who: str | None = None) -> Any:
    """Log a signed bundle as the run's `model/` artifacts, register it as a new version of
    `name`, and point `alias` at it (if given; audited, with `description` as the why)."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow.log_artifacts(run_id, str(bundle_dir), BUNDLE_ARTIFACT_PATH)
    except (MlflowException, OSError) as exc:
        raise _unreachable(mlflow, f"log the bundle of run {run_id}", exc) from exc
    version = register(mlflow, name, run_id, tags=tags, description=description)
    if alias is not None:
        move_alias(mlflow, name, alias, version.version, why=description, who=who,
                   mlflow_run_id=run_id)
    return version
