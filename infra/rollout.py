"""Roll-out: after training, the model service serves the champion.

Above the layers on purpose: it joins what the batch layer trained (the train task's
summary and the registry) to what the speed layer serves (the Ray Serve model service).
The train DAG's last task calls it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from lakehouse.config import Settings
from lakehouse.errors import RolloutError
from lakehouse.registry import CHAMPION
from lakehouse.serve import APP_NAME, connect, deployed_apps, served_version
from speed.model_service import ServiceArgs, serve_on_ray

__all__ = ["roll_out"]

Echo = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)  # noqa: T201 - task logs


def roll_out(settings: Settings, trained: dict[str, Any], echo: Echo = _print,
             timeout_s: float = 300.0) -> dict[str, Any]:
    """Make the model service serve the champion: deploy it if it is not running, else wait
    until its registry poller has swapped the new champion in. `trained` is the summary
    `batch.jobs.train` returns; RolloutError if the swap takes longer than `timeout_s`."""
    connect(settings)  # the local platform's Ray environment first, then ray.init
    if APP_NAME not in deployed_apps():  # in any state, not only RUNNING
        info = serve_on_ray(settings.ray_address, ServiceArgs.from_settings(settings))
        echo(f"deployed the model service: v{info['version']}")
        return {"served_version": info["version"], "deployed": True}
    if trained.get("alias") != CHAMPION:
        served = served_version(APP_NAME)
        echo(f"v{trained.get('version')} is not the champion: the service keeps v{served}")
        return {"served_version": served, "deployed": False}
    deadline = time.monotonic() + timeout_s
    while True:
        served = served_version(APP_NAME)
        if served == trained["version"]:
            echo(f"the model service serves v{served}")
            return {"served_version": served, "deployed": False}
        if time.monotonic() > deadline:
            raise RolloutError(f"the model service still serves v{served} {timeout_s:.0f}s after "
                               f"v{trained['version']} became champion: see its replica logs")
        time.sleep(2.0)
