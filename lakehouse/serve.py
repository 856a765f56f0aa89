"""The Ray Serve client: how any layer finds and calls the model service.

The model service (`speed.model_service`) is one Serve application per registry alias:
`model` serves the champion (the speed layer's and /predict's), `model-<alias>` another
(the challenger of a traffic split). Everything that talks to it from outside (the speed
layer, the API, the roll-out after training, the tests) goes through here: the Ray
environment of the local platform, connecting, a scoring handle, what is running and
which version an application serves.

Ray reads its environment when it is imported, so `connect` sets it first; Ray itself is
imported only by the functions that use it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from lakehouse.config import Settings
from lakehouse.errors import ServiceError
from lakehouse.registry import CHAMPION

__all__ = ["APP_NAME", "DEPLOYMENT", "AsyncScoreCall", "app_name", "async_score_call",
           "Scorer", "connect", "deployed_apps", "ray_is_local", "ray_local_env", "running_apps",
           "serve_scorer", "served_version"]

APP_NAME = "model"
DEPLOYMENT = "ModelScorer"

# rows → (scores, model version)
Scorer = Callable[[list[list[float]]], tuple[list[float], int]]
# rows → {"scores": [...], "model_version": n}
AsyncScoreCall = Callable[[list[list[float]]], Awaitable[dict[str, Any]]]


def app_name(alias: str = CHAMPION) -> str:
    """The Serve application serving an alias: `model` for the champion, `model-<alias>`
    for another."""
    return APP_NAME if alias == CHAMPION else f"{APP_NAME}-{alias}"


def ray_is_local(settings: Settings) -> bool:
    """Whether the Ray head is this machine's: the one `lambdalake up` starts (manage_ray),
    or one at a loopback address."""
    address = settings.ray_address.removeprefix("ray://")
    host = address.rsplit(":", 1)[0].strip("[]")
    return settings.manage_ray or host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def ray_local_env(settings: Settings | None = None, *,
                  environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for processes that start or join the local Ray head; nothing for a Ray
    cluster elsewhere (`ray_is_local`), whose clients bring their own (a pod's
    RAY_AUTH_MODE=token and RAY_AUTH_TOKEN). Without settings the head is taken to be local.

    Ray resolves "127.0.0.1" to the machine's outward address unless told that this is a
    single-machine cluster; the local platform talks only to loopback. Ray's token
    authentication is off for the same reason: with it on, every process that joins needs
    the token file Ray keeps in ~/.ray, state outside the platform's state dir that a
    second platform (tests) or an older head can leave stale. A RAY_AUTH_MODE already in
    `environ` (default: this process's environment) is never overridden: whoever set it
    chose the head's and its clients' authentication.
    """
    if settings is not None and not ray_is_local(settings):
        return {}
    env = {
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEDUP_LOGS": "0",
    }
    if "RAY_AUTH_MODE" in (os.environ if environ is None else environ):
        del env["RAY_AUTH_MODE"]
    return env


def connect(settings: Settings | None = None, *, address: str | None = None,
            quiet: bool = False) -> None:
    """Join the platform's Ray cluster (once per process). With settings, the local
    platform's environment is set first (`ray_local_env`), since Ray reads it when imported;
    without, the address is joined with the environment as it is."""
    if settings is not None:
        os.environ.update(ray_local_env(settings))
    import ray

    if ray.is_initialized():
        return
    target = address or (settings.ray_address if settings is not None else "auto")
    try:
        if quiet:
            ray.init(address=target, log_to_driver=False, logging_level=logging.WARNING)
        else:
            ray.init(address=target, log_to_driver=False)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        raise ServiceError(f"cannot join the Ray cluster at {target} ({_first_line(exc)}): start "
                           "the platform with `lambdalake up`, or set LAMBDALAKE_RAY_ADDRESS to "
                           "a running Ray head") from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _app_handle(app: str) -> Any:
    """The handle of an application's ingress deployment; ServiceError if it is not deployed."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_app_handle(app)
    except (RayServeException, ValueError) as exc:
        raise ServiceError(f"the model service application {app!r} is not deployed on Ray "
                           f"({_first_line(exc)}): deploy it with `lambdalake model serve`") from exc


def serve_scorer(app: str = APP_NAME, *, timeout_s: float = 60.0) -> Scorer:
    """Score a batch of rows through an application's deployment handle, blocking (the
    speed layer: its micro-batch is scored at once, `score_batch`)."""
    handle = _app_handle(app)

    def score(rows: list[list[float]]) -> tuple[list[float], int]:
        answer = handle.score_batch.remote(rows).result(timeout_s=timeout_s)
        return answer["scores"], int(answer["model_version"])

    return score


def async_score_call(app: str) -> AsyncScoreCall:
    """Score rows through an application's deployment handle, from async code (the API)."""
    handle = _app_handle(app)

    async def call(rows: list[list[float]]) -> dict[str, Any]:
        answer: dict[str, Any] = await handle.score.remote(rows)
        return answer

    return call


def deployed_apps() -> set[str]:
    """The Serve applications deployed in any state, deploying or failed too (Ray must be
    connected)."""
    from ray import serve

    return set(serve.status().applications)


def running_apps() -> set[str]:
    """The Serve applications that are up (Ray must be connected)."""
    from ray import serve

    return {name for name, app in serve.status().applications.items()
            if str(app.status) in ("RUNNING", "ApplicationStatus.RUNNING")}


def served_version(app: str = APP_NAME, *, timeout_s: float = 60.0) -> int:
    """The model version an application serves now (Ray must be connected)."""
    info = _app_handle(app).info.remote().result(timeout_s=timeout_s)
    return int(info["version"])
