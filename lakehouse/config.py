"""The one settings object of lambdalake.

Read once, by `load_settings()`, from (highest priority first):
1. keyword overrides passed by the caller (tests, the CLI's own options);
2. environment variables `LAMBDALAKE_<FIELD>` (e.g. `LAMBDALAKE_KAFKA_BOOTSTRAP_SERVERS`);
3. a TOML file named by `LAMBDALAKE_CONFIG`, else `./lambdalake.toml` when it exists;
4. the defaults below, which describe the embedded local platform.

Pointing at real clusters is a change of settings only (Spark master URL, Kafka bootstrap
servers, Ray address, a Delta root on object storage). Every other module receives the
settings (or the values it needs) from its caller; nothing else reads the environment.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from lakehouse.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

ENV_PREFIX = "LAMBDALAKE_"
CONFIG_FILE_ENV = "LAMBDALAKE_CONFIG"
DEFAULT_CONFIG_FILE = Path("lambdalake.toml")

_HOST_PORT = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")
_JVM_MEMORY = re.compile(r"^\d+[kKmMgG]$")


class CrossFieldError(ValueError):
    """A rule over several settings broke; `fields` are the ones to fix. A model-level
    validator raises this so that `load_settings` can name the variables without showing
    its input (the whole settings object, secrets included)."""

    def __init__(self, fields: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.fields = fields


def _config_file() -> Path | None:
    named = os.environ.get(CONFIG_FILE_ENV)
    if named:
        path = Path(named)
        if not path.is_file():
            raise ConfigError(
                f"{CONFIG_FILE_ENV}={named!r} does not name a readable file: "
                "create it or unset the variable"
            )
        return path
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


class Settings(BaseSettings):
    """Where every part of the platform lives and how big it may grow."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        validate_default=True,
        frozen=True,
    )

    # --- storage -------------------------------------------------------------------------
    state_dir: Path = Field(
        default=Path("var"),
        description="All mutable local state: Kafka data, Delta tables, MLflow store, "
        "Airflow home, logs, pid files, jars.",
    )
    delta_root: str = Field(
        default="",
        description="Root URI of the Delta lakehouse (file path, s3a://, abfss://, gs://). "
        "Empty means <state_dir>/delta.",
    )

    # --- Kafka ---------------------------------------------------------------------------
    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        description="Comma-separated host:port list of Kafka brokers.",
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT",
        description="How lambdalake's Kafka clients connect (Kafka's security.protocol); the "
        "local broker speaks PLAINTEXT only.",
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None, description="SASL mechanism of a SASL_* security protocol.",
    )
    kafka_sasl_username: str = Field(default="", description="SASL user of lambdalake's Kafka clients.")
    kafka_sasl_password: SecretStr = Field(
        default=SecretStr(""), description="SASL password of lambdalake's Kafka clients.",
    )
    kafka_ssl_cafile: Path | None = Field(
        default=None,
        description="PEM file of the CA certificates the brokers' TLS certificates are checked "
        "against (SSL, SASL_SSL). Empty means the system's trust store.",
    )
    kafka_partitions: int = Field(
        default=4, ge=1, le=1024, description="Partitions of topics lambdalake creates."
    )
    kafka_heap: str = Field(default="512m", description="JVM heap (-Xmx) of the local broker.")
    manage_kafka: bool = Field(
        default=True, description="`lambdalake up` starts a local broker (false on a cluster)."
    )

    # --- Spark ---------------------------------------------------------------------------
    spark_master: str = Field(default="local[2]", description="Spark master URL.")
    spark_driver_memory: str = Field(default="2g", description="spark.driver.memory.")
    spark_shuffle_partitions: int = Field(
        default=4, ge=1, description="spark.sql.shuffle.partitions."
    )

    batch_max_failure_rate: float = Field(
        default=0.05, ge=0.0, le=1.0,
        description="A validation slice whose share of invalid records exceeds this is refused, "
        "unwritten, until `lambdalake batch accept`.",
    )

    # --- Ray / Ray Serve -----------------------------------------------------------------
    ray_address: str = Field(
        default="127.0.0.1:6379", description="Address of the Ray head (GCS host:port)."
    )
    ray_object_store_memory_mb: int = Field(
        default=512, ge=78, description="Object store cap of the local Ray head, in MiB."
    )
    manage_ray: bool = Field(
        default=True, description="`lambdalake up` starts a local Ray head."
    )
    serve_http_port: int = Field(default=8000, ge=1, le=65535, description="Ray Serve HTTP port.")
    serve_min_replicas: int = Field(default=1, ge=0, description="Model deployment min replicas.")
    serve_max_replicas: int = Field(default=2, ge=1, description="Model deployment max replicas.")
    serve_num_gpus: float = Field(
        default=0.0, ge=0.0, description="GPUs per model replica (fractions allowed; 0 = CPU)."
    )

    # --- Airflow -------------------------------------------------------------------------
    airflow_home: Path | None = Field(
        default=None, description="AIRFLOW_HOME. Empty means <state_dir>/airflow."
    )
    airflow_port: int = Field(default=8080, ge=1, le=65535, description="Airflow UI/API port.")
    airflow_user: str = Field(default="admin", description="Airflow UI login name.")
    airflow_password: SecretStr = Field(
        default=SecretStr(""),
        description="Airflow UI login password. Empty means the one generated on first `up` "
        "in <state_dir>/secrets/airflow-admin-password (mode 0600).",
    )
    airflow_pause_new_dags: bool = Field(
        default=False, description="New DAGs start paused (their schedules wait for an unpause).",
    )
    manage_airflow: bool = Field(
        default=True, description="`lambdalake up` starts Airflow's processes."
    )

    # --- MLflow --------------------------------------------------------------------------
    mlflow_port: int = Field(default=5000, ge=1, le=65535, description="MLflow server port.")
    mlflow_tracking_uri: str = Field(
        default="",
        description="MLflow tracking/registry URI. Empty means the local server "
        "http://127.0.0.1:<mlflow_port>.",
    )
    manage_mlflow: bool = Field(
        default=True, description="`lambdalake up` starts a local MLflow server."
    )

    # --- online store (Redis) --------------------------------------------------------
    redis_port: int = Field(
        default=6390, ge=1, le=65535,
        description="Port of the local online store (redis-server), clear of Ray's 6379-6383 and workers.",
    )
    redis_maxmemory: str = Field(
        default="256mb", pattern=r"^[0-9]+(kb|mb|gb)?$",
        description="Memory cap of the local redis-server (maxmemory; a full store refuses "
        "writes rather than evicting increments).",
    )
    online_store_url: str = Field(
        default="",
        description="Redis URL of the online store (any Redis-protocol server). Empty means "
        "the local redis://127.0.0.1:<redis_port>/0.",
    )
    online_store_password: SecretStr = Field(
        default=SecretStr(""), description="Password (AUTH) of the online store.",
    )
    manage_redis: bool = Field(
        default=True, description="`lambdalake up` starts a local redis-server.",
    )

    # --- model training and registry ---------------------------------------------------
    model_name: str = Field(
        default="fraud", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="Registered model name in MLflow.",
    )
    model_signing_key: Path | None = Field(
        default=None,
        description="Ed25519 private key (PEM) that signs model bundles. Empty means "
        "<state_dir>/secrets/model-signing.pem, created on first training.",
    )
    model_verify_key: Path | None = Field(
        default=None,
        description="Ed25519 public key (PEM) that scorers verify bundles with. Empty means "
        "the signing key's path plus .pub.",
    )
    train_epochs: int = Field(default=8, ge=1, le=1000, description="Training epochs.")
    train_holdout_fraction: float = Field(
        default=0.2, gt=0.0, lt=1.0,
        description="Share of labelled events, the latest by event time, held out for evaluation.",
    )
    train_num_processes: int = Field(
        default=1, ge=1, description="TorchDistributor processes (local mode) or Spark tasks.",
    )
    train_use_gpu: bool = Field(
        default=False, description="Train on GPUs (TorchDistributor use_gpu; NCCL backend).",
    )

    # --- drift and maintenance (Airflow DAGs) -------------------------------------------
    drift_window_hours: float = Field(
        default=24.0, gt=0, description="Scored events of this many past hours are compared "
        "with the champion's training rows.",
    )
    drift_psi_threshold: float = Field(
        default=0.2, gt=0, description="A feature whose PSI exceeds this is drift (retrain).",
    )
    drift_min_events: int = Field(
        default=200, ge=1, description="Fewer scored events in the window are too few to judge.",
    )
    delta_vacuum_retention_hours: int = Field(
        default=168, ge=0, description="VACUUM keeps files younger than this (Delta time travel).",
    )
    delta_vacuum_allow_unsafe_retention: bool = Field(
        default=False, description="Allow a VACUUM retention below Delta's safe 168 h (readers "
        "of older snapshots and time travel may fail). Files a stream has yet to read are "
        "never vacuumed.",
    )

    # --- speed layer ---------------------------------------------------------------------
    speed_group: str = Field(
        default="lambdalake-speed", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
        description="Kafka consumer group of the speed layer; the serving layer merges its "
        "scored events.",
    )
    speed_max_wait_ms: int = Field(
        default=50, ge=1, le=60_000,
        description="Longest wait of the speed layer for a micro-batch to fill: what a quiet "
        "stream adds to freshness.",
    )
    speed_flush_s: float = Field(
        default=1.0, gt=0, le=3600,
        description="How often a speed member appends the scored rows the online store holds "
        "to Delta `speed/scored_events` (one commit for all its partitions).",
    )

    speed_metrics_port: int = Field(
        default=9108, ge=1, le=65535,
        description="Prometheus metrics of the speed layer `lambdalake up --apps` runs.",
    )
    apps_metrics_port: int | None = Field(
        default=None, ge=1, le=65535,
        description="Prometheus metrics (restarts, up/down) of the supervisor of the speed "
        "layer; the API's supervisor uses the next port. Empty means "
        "LAMBDALAKE_SPEED_METRICS_PORT + 1.",
    )

    # --- serving: merged views, SQL, HTTP API --------------------------------------------
    api_host: str = Field(default="127.0.0.1", description="Bind host of the HTTP API.")
    api_port: int = Field(
        default=8001, ge=1, le=65535, description="Port of the HTTP API (Ray Serve has 8000)."
    )
    api_keys: SecretStr = Field(
        default=SecretStr(""),
        description="API keys as name:key:scope+scope, comma-separated (scopes: predict, "
        "features, sql). Empty: read api_keys_file.",
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="File of API keys, one name:key:scopes per line. Empty means "
        "<state_dir>/secrets/api-keys, created with one admin key on first `serve`.",
    )
    api_max_body_bytes: int = Field(
        default=1_048_576, ge=1024, description="Largest request body the API reads (413 above)."
    )
    api_max_batch: int = Field(
        default=1000, ge=1, description="Most events in one POST /v1/predict/batch."
    )
    sql_row_cap: int = Field(default=10_000, ge=1, description="Most rows a SQL answer holds.")
    sql_timeout_s: float = Field(
        default=10.0, gt=0, description="A SQL query running longer is stopped (4xx)."
    )
    serving_refresh_s: float = Field(
        default=0.25, gt=0, description="How often the API's SQL views catch up with the online store "
        "(the changes since the last refresh) and look for a newer published run."
    )
    duckdb_memory_limit: str = Field(
        default="2GB", pattern=r"^\d+(\.\d+)?\s*(KB|MB|GB|KiB|MiB|GiB)$",
        description="DuckDB memory cap of the embedded SQL engine.",
    )
    rollout_challenger_weight: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Share of /predict traffic (sticky per entity) scored by the challenger.",
    )
    prediction_cache_size: int = Field(
        default=10_000, ge=0, description="Recent predictions kept per (model version, features)."
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level of lambdalake's own loggers."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _check_bootstrap(cls, value: str) -> str:
        servers = [s.strip() for s in value.split(",") if s.strip()]
        bad = [s for s in servers if not _HOST_PORT.match(s)]
        if not servers or bad:
            raise ValueError(f"expected host:port[,host:port...], got {value!r}")
        return ",".join(servers)

    @field_validator("online_store_password")
    @classmethod
    def _check_store_password(cls, value: SecretStr) -> SecretStr:
        if any(c in value.get_secret_value() for c in '"\\\n\r'):
            raise ValueError("must not contain a double quote, a backslash or a line break "
                             "(it is written into redis-server's config file)")
        return value

    @field_validator("ray_address")
    @classmethod
    def _check_ray_address(cls, value: str) -> str:
        if value.startswith("ray://") or _HOST_PORT.match(value):
            return value
        raise ValueError(f"expected host:port or ray://host:port, got {value!r}")

    @field_validator("kafka_heap", "spark_driver_memory")
    @classmethod
    def _check_jvm_memory(cls, value: str) -> str:
        if not _JVM_MEMORY.match(value):
            raise ValueError(f"expected a JVM memory size such as 512m or 2g, got {value!r}")
        return value

    @field_validator("spark_master")
    @classmethod
    def _check_spark_master(cls, value: str) -> str:
        if re.match(r"^(local(\[(\*|\d+)\])?|spark://.+|k8s://.+|yarn)$", value):
            return value
        raise ValueError(
            f"expected local[N], local[*], spark://host:port, k8s://url or yarn, got {value!r}"
        )

    @model_validator(mode="after")
    def _check_kafka_security(self) -> Settings:
        protocol = self.kafka_security_protocol
        sasl = {"kafka_sasl_mechanism": self.kafka_sasl_mechanism,
                "kafka_sasl_username": self.kafka_sasl_username,
                "kafka_sasl_password": self.kafka_sasl_password.get_secret_value()}
        if protocol.startswith("SASL_"):
            missing = tuple(name for name, value in sasl.items() if not value)
            if missing:
                raise CrossFieldError(missing, f"kafka_security_protocol {protocol} needs "
                                      f"{', '.join(missing)} (the password is never shown)")
        elif any(sasl.values()):
            given = tuple(name for name, value in sasl.items() if value)
            raise CrossFieldError(("kafka_security_protocol", *given),
                                  f"{', '.join(given)} set but kafka_security_protocol {protocol} "
                                  "sends no SASL credentials: use SASL_SSL or SASL_PLAINTEXT")
        if self.kafka_ssl_cafile is not None and not protocol.endswith("SSL"):
            raise CrossFieldError(("kafka_security_protocol", "kafka_ssl_cafile"),
                                  f"kafka_ssl_cafile set but kafka_security_protocol {protocol} "
                                  "uses no TLS: use SSL or SASL_SSL")
        if self.manage_kafka and protocol != "PLAINTEXT":
            raise CrossFieldError(("manage_kafka", "kafka_security_protocol"),
                                  f"the broker `lambdalake up` starts (manage_kafka) speaks PLAINTEXT "
                                  f"only, not {protocol}: set manage_kafka false to use your cluster")
        return self

    @model_validator(mode="after")
    def _check_replicas(self) -> Settings:
        if self.serve_min_replicas > self.serve_max_replicas:
            raise CrossFieldError(
                ("serve_min_replicas", "serve_max_replicas"),
                f"serve_min_replicas ({self.serve_min_replicas}) must not exceed "
                f"serve_max_replicas ({self.serve_max_replicas})",
            )
        return self

    # --- derived locations ---------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.state_dir.resolve()

    @property
    def delta_uri(self) -> str:
        return self.delta_root or str(self.state_path / "delta")

    @property
    def airflow_home_path(self) -> Path:
        return (self.airflow_home or self.state_path / "airflow").resolve()

    @property
    def mlflow_uri(self) -> str:
        return self.mlflow_tracking_uri or f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def online_store_uri(self) -> str:
        return self.online_store_url or f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def signing_key_path(self) -> Path:
        return (self.model_signing_key or self.state_path / "secrets" / "model-signing.pem").resolve()

    @property
    def verify_key_path(self) -> Path:
        if self.model_verify_key is not None:
            return self.model_verify_key.resolve()
        return self.signing_key_path.with_name(self.signing_key_path.name + ".pub")

    @property
    def api_keys_path(self) -> Path:
        return (self.api_keys_file or self.state_path / "secrets" / "api-keys").resolve()

    @property
    def airflow_password_path(self) -> Path:
        """Where `up` writes the generated Airflow admin password (when none is set)."""
        return self.state_path / "secrets" / "airflow-admin-password"

    @property
    def models_dir(self) -> Path:
        """Local copies of model bundles and training reports."""
        return self.state_path / "models"

    @property
    def logs_dir(self) -> Path:
        return self.state_path / "logs"

    @property
    def run_dir(self) -> Path:
        """Pid files of the services `lambdalake up` started."""
        return self.state_path / "run"

    @property
    def jars_dir(self) -> Path:
        return self.state_path / "jars"

    @property
    def kafka_port(self) -> int:
        """Port of the local broker: that of the first bootstrap server."""
        return int(self.kafka_bootstrap_servers.split(",")[0].rsplit(":", 1)[1])


def load_settings(**overrides: Any) -> Settings:
    """Read the settings; a bad value raises ConfigError naming the variable(s) to fix. No
    secret reaches the message (see `_describe`)."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = [_describe(error) for error in exc.errors()]
        raise ConfigError(
            "invalid lambdalake configuration:\n  " + "\n  ".join(problems)
        ) from None


def _variable(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def _shows_its_input(field: str) -> bool:
    """Whether a bad value of `field` may be echoed: only a known setting that is not a
    secret. A misspelt name may well be a secret's (`api_key`), so its value is not shown."""
    known = Settings.model_fields.get(field)
    return known is not None and known.annotation is not SecretStr


def _describe(error: Any) -> str:
    """One problem of a ValidationError: the variable(s) to fix, what is wrong, and the value
    given only where it cannot be a secret. A model-level error's input is the whole
    settings dict, so it is never shown; its CrossFieldError names the fields instead."""
    loc = error.get("loc") or ()
    message = error["msg"]
    if not loc:
        cause = (error.get("ctx") or {}).get("error")
        fields = getattr(cause, "fields", ())
        where = ", ".join(_variable(f) for f in fields) if fields else "settings"
        return f"{where}: {message}"
    field = str(loc[0])
    where = _variable(".".join(str(part) for part in loc))
    if _shows_its_input(field):
        return f"{where}: {message} (got {error.get('input')!r})"
    return f"{where}: {message} (value not shown: it may be a secret)"


def settings_table() -> list[tuple[str, str, str]]:
    """(environment variable, default, description) for every setting: the README's table."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, SecretStr):
            default = default.get_secret_value()
        if default is None:
            default = ""
        rows.append((f"{ENV_PREFIX}{name.upper()}", str(default), field.description or ""))
    return rows


# --- option classes built from the settings ------------------------------------------------
# An option class (a dataclass such as `speed.consumer.SpeedOptions`) declares each field that
# a setting supplies with `setting_field("<setting>")`: its default is the setting's default,
# read from `Settings`, so no value is written twice, and `options_from_settings` fills it
# from a settings object. Fields without a setting keep their own defaults.

SETTING = "lambdalake.setting"
"""Key, in a dataclass field's metadata, of the setting (or `Settings` property) it comes from."""

_Options = TypeVar("_Options", bound="DataclassInstance")


def setting_default(name: str) -> Any:
    """The default value of setting `name`, as `Settings` declares it."""
    try:
        field = Settings.model_fields[name]
    except KeyError:
        raise ConfigError(f"no setting named {name!r}") from None
    return field.get_default(call_default_factory=True)


def setting_field(name: str) -> Any:
    """A dataclass field that setting `name` supplies, defaulting to the setting's default. (A
    field without a default, or one a derived `Settings` property supplies, is declared as
    `dataclasses.field(metadata={SETTING: name})`.)"""
    return dataclasses.field(default=setting_default(name), metadata={SETTING: name})


def options_from_settings(cls: type[_Options], settings: Settings, **overrides: Any) -> _Options:
    """An instance of option class `cls` whose setting fields (`setting_field`) hold the values
    of `settings`; `overrides` (by field name) win over them and set the other fields."""
    values = {f.name: getattr(settings, f.metadata[SETTING])
              for f in dataclasses.fields(cls) if SETTING in f.metadata}
    return cls(**{**values, **overrides})
