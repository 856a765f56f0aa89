"""`lambdalake serve`: the HTTP API in uvicorn, scoring through Ray Serve deployment handles.

The API runs in its own process (uvicorn, one worker, async) rather than as a Ray Serve
ingress: Serve's HTTP proxy would add a hop per request, while a handle call from here goes
straight to the model replicas, batched with the speed layer's calls by `@serve.batch`.
Scale out by running more API processes behind a load balancer; each holds its own DuckDB
snapshot of the lakehouse.
"""

from __future__ import annotations

import logging

from lakehouse.config import Settings
from lakehouse.logs import json_logging
from lakehouse.online import open_store
from lakehouse.registry import CHALLENGER, CHAMPION
from lakehouse.serve import app_name, async_score_call, connect, running_apps
from lakehouse.spec import PlatformSpec
from lakehouse.streams import topic_partitions
from lakehouse.tables import Lakehouse
from serving.api import Serving, ServingConfig, create_app
from serving.auth import load_api_keys
from serving.duck import DuckEngine
from serving.rollout import PredictionCache, Rollout

log = logging.getLogger("lambdalake.serving")


def build_serving(settings: Settings, spec: PlatformSpec, *, lakehouse: Lakehouse | None = None,
                  create_keys: bool = False) -> tuple[Serving, str | None]:
    """The API's parts, connected to the platform's Ray cluster (initialised here)."""
    connect(settings, quiet=True)
    keys, created = load_api_keys(settings.api_keys.get_secret_value(), settings.api_keys_path,
                                  create=create_keys)
    lakehouse = lakehouse or Lakehouse(settings.delta_uri)
    engine = DuckEngine(spec, lakehouse, store=open_store(settings, spec, root=lakehouse.root),
                        partitions=max(settings.kafka_partitions, topic_partitions(settings, spec.events.topic)),
                        memory_limit=settings.duckdb_memory_limit)
    rollout = Rollout({CHAMPION: async_score_call(app_name(CHAMPION))}, settings.rollout_challenger_weight,
                      PredictionCache(settings.prediction_cache_size))

    def discover_arms() -> None:
        """Follow the challenger app: route its share to it while it runs."""
        weight = settings.rollout_challenger_weight
        running = CHALLENGER in rollout.arms
        if weight <= 0:
            return
        available = app_name(CHALLENGER) in running_apps()
        if available and not running:
            rollout.arms[CHALLENGER] = async_score_call(app_name(CHALLENGER))
            rollout.challenger_weight = weight
            log.info("rollout: %.0f%% of entities to the challenger", weight * 100)
        elif running and not available:
            rollout.challenger_weight = 0.0
            del rollout.arms[CHALLENGER]
            log.warning("rollout: the challenger app is gone; all traffic to the champion")

    discover_arms()
    serving = Serving(spec, engine, rollout, keys, ServingConfig.from_settings(settings),
                      discover_arms=discover_arms)
    return serving, created


def serve_api(settings: Settings, spec: PlatformSpec, *, host: str, port: int) -> None:
    """Run the API until SIGTERM/SIGINT."""
    import uvicorn

    json_logging(settings.log_level)
    serving, created = build_serving(settings, spec, create_keys=True)
    if created:
        log.warning("created %s with an admin API key (all scopes): use header X-API-Key: <key from "
                    "that file>", settings.api_keys_path)
    uvicorn.run(create_app(serving), host=host, port=port, log_level="warning", access_log=False)
