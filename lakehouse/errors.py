"""The exception tree. Every error lambdalake raises on purpose derives from PlatformError,
so callers (the CLI, the HTTP API, DAG tasks) can tell our errors, which carry a message
that says what to do, from bugs. Vendor errors are translated at the layer boundary."""

from __future__ import annotations


class PlatformError(Exception):
    """Root of every error lambdalake raises deliberately."""


class ConfigError(PlatformError):
    """A setting is missing or invalid; the message names the setting and how to fix it."""


class ServiceError(PlatformError):
    """A local service could not be started, stopped or reached."""


class SpecError(PlatformError):
    """The platform spec (schemas, feature views, model inputs) is inconsistent."""


class ValidationError(PlatformError):
    """A record does not satisfy the spec; `reasons` lists each failed rule."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


class DataQualityError(PlatformError):
    """A batch run found more invalid records than the configured threshold allows."""


class ServingError(PlatformError):
    """The serving layer cannot answer a request as asked (a 4xx for an HTTP caller)."""


class SqlError(ServingError):
    """A query an engine (DuckDB or Spark SQL) refuses or cannot answer; the message says why."""


class SqlTimeout(SqlError):
    """A query ran past its timeout and was stopped."""
