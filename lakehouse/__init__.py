"""The shared core: what every layer agrees on and nothing layer-specific.

The spec and its one validation routine, the dedup rule, the monoids and the fold, the table contracts
(paths, batch runs, the scored-events table), the type map, the model registry, the Ray
Serve client, Kafka client settings, configuration and the error tree. The core imports no
layer and no infra (`lint-imports`, setup.cfg); every module here is public to the layers.
"""

__all__ = [
    "bundle", "config", "dedup", "errors", "fastparse", "features", "fraud", "generator", "jvm", "logs",
    "model", "online", "monoids", "recompute", "registry", "safejson", "scored", "secret_files", "serve",
    "spark", "spec", "streams", "tables", "types",
]
