"""The exception tree. Every error lambdalake raises on purpose derives from PlatformError,
so callers (the CLI, the HTTP API, DAG tasks) can tell our errors, which carry a message
that says what to do, from bugs. Vendor errors are translated at the layer boundary.

    PlatformError
    ├── ConfigError            settings (the core)
    ├── SpecError              the platform spec (the core)
    ├── ValidationError        a record against the spec (the core)
    │   └── BadRequest         speed.model_service: a scoring request that cannot be served
    ├── StaleRunError          lakehouse.tables: a batch run covers less than the published one
    ├── ModelSignatureError    lakehouse.bundle: unsigned, signed by another key, or changed
    ├── ModelSpecError         lakehouse.bundle: a model bundle was made for another spec
    ├── ServiceError           a service could not be started, stopped or reached
    │   ├── StoreBehindError   lakehouse.online.base: a step would leave a gap in the store
    │   ├── RolloutError       infra: the model service did not take the new champion
    │   └── DemoError          infra: a stage of `lambdalake demo` failed
    ├── BatchError             the batch layer
    │   └── DataQualityError
    ├── SpeedError             the speed layer
    └── ServingError           the serving layer
        ├── SqlError
        │   └── SqlTimeout
        └── MergeCheckError    the exact-merge check could not read what it compares

The classes named with a module are defined there, beside the contract they belong to;
the rest are defined here. The CLI prints any of them as one line and exits non-zero (2 for
a ConfigError, else 1).
"""

from __future__ import annotations

__all__ = ["BatchError", "ConfigError", "DataQualityError", "DemoError", "MergeCheckError",
           "PlatformError", "RolloutError", "ServiceError", "ServingError", "SpecError",
           "SpeedError", "SqlError", "SqlTimeout", "ValidationError"]


class PlatformError(Exception):
    """Root of every error lambdalake raises deliberately."""


class ConfigError(PlatformError):
    """A setting is missing or invalid; the message names the setting and how to fix it."""


class ServiceError(PlatformError):
    """A local service could not be started, stopped or reached."""


class RolloutError(ServiceError):
    """The model service did not serve the new champion in time (infra's roll-out)."""


class DemoError(ServiceError):
    """A stage of `lambdalake demo` failed (a DAG run, the speed layer catching up, ...)."""


class SpecError(PlatformError):
    """The platform spec (schemas, feature views, model inputs) is inconsistent."""


class ValidationError(PlatformError):
    """A record does not satisfy the spec; `reasons` lists each failed rule."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


class BatchError(PlatformError):
    """The batch layer cannot do a step as asked (no published run, no labels, ...)."""


class DataQualityError(BatchError):
    """A batch run found more invalid records than the configured threshold allows."""


class SpeedError(PlatformError):
    """The speed layer cannot go on as asked."""


class ServingError(PlatformError):
    """The serving layer cannot answer as asked; a request's own error (SqlError) is a 4xx
    for an HTTP caller."""


class SqlError(ServingError):
    """A query an engine (DuckDB or Spark SQL) refuses or cannot answer; the message says why."""


class SqlTimeout(SqlError):
    """A query ran past its timeout and was stopped."""


class MergeCheckError(ServingError):
    """The exact-merge check could not read the events it recomputes (the topic up to the
    merged views' coverage)."""
