"""Settings: defaults describe the local platform, environment and file override them, and
bad values fail with a message that names the variable to fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lakehouse.config import CONFIG_FILE_ENV, Settings, load_settings, settings_table
from lakehouse.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("LAMBDALAKE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no ./lambdalake.toml unless a test writes one


def test_defaults_are_the_local_platform() -> None:
    settings = load_settings()
    assert settings.kafka_bootstrap_servers == "127.0.0.1:9092"
    assert settings.spark_master == "local[2]"
    assert settings.delta_uri == str(Path("var").resolve() / "delta")
    assert settings.mlflow_uri == "http://127.0.0.1:5000"
    assert settings.airflow_home_path == Path("var").resolve() / "airflow"
    assert settings.serve_num_gpus == 0.0


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMBDALAKE_KAFKA_BOOTSTRAP_SERVERS", "kafka-0:9092, kafka-1:9092")
    monkeypatch.setenv("LAMBDALAKE_SPARK_MASTER", "spark://spark-master:7077")
    monkeypatch.setenv("LAMBDALAKE_DELTA_ROOT", "s3a://lake/fraud")
    monkeypatch.setenv("LAMBDALAKE_SERVE_NUM_GPUS", "0.25")
    settings = load_settings()
    assert settings.kafka_bootstrap_servers == "kafka-0:9092,kafka-1:9092"
    assert settings.spark_master == "spark://spark-master:7077"
    assert settings.delta_uri == "s3a://lake/fraud"
    assert settings.serve_num_gpus == 0.25


def test_toml_file_and_priority(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "cluster.toml"
    config.write_text('ray_address = "ray-head:6379"\nkafka_partitions = 12\n')
    monkeypatch.setenv(CONFIG_FILE_ENV, str(config))
    monkeypatch.setenv("LAMBDALAKE_KAFKA_PARTITIONS", "6")  # environment beats the file
    settings = load_settings()
    assert settings.ray_address == "ray-head:6379"
    assert settings.kafka_partitions == 6


def test_default_file_in_working_directory(tmp_path: Path) -> None:
    (tmp_path / "lambdalake.toml").write_text('spark_master = "local[*]"\n')
    assert load_settings().spark_master == "local[*]"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("LAMBDALAKE_KAFKA_BOOTSTRAP_SERVERS", "localhost", "host:port"),
        ("LAMBDALAKE_KAFKA_PARTITIONS", "zero", "valid integer"),
        ("LAMBDALAKE_KAFKA_PARTITIONS", "0", "greater than or equal to 1"),
        ("LAMBDALAKE_SPARK_MASTER", "local[two]", "local[N]"),
        ("LAMBDALAKE_KAFKA_HEAP", "lots", "JVM memory size"),
        ("LAMBDALAKE_SERVE_NUM_GPUS", "-1", "greater than or equal to 0"),
        ("LAMBDALAKE_RAY_ADDRESS", "head", "host:port"),
        ("LAMBDALAKE_LOG_LEVEL", "LOUD", "DEBUG"),
        ("LAMBDALAKE_AIRFLOW_PORT", "70000", "less than or equal to 65535"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert variable in str(error.value)
    assert expected in str(error.value)


def test_cross_field_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMBDALAKE_SERVE_MIN_REPLICAS", "3")
    monkeypatch.setenv("LAMBDALAKE_SERVE_MAX_REPLICAS", "2")
    with pytest.raises(ConfigError, match="serve_min_replicas"):
        load_settings()


def test_unknown_setting_in_file_is_rejected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "typo.toml"
    config.write_text('kafka_bootstrap = "x:1"\n')
    monkeypatch.setenv(CONFIG_FILE_ENV, str(config))
    with pytest.raises(ConfigError, match="LAMBDALAKE_KAFKA_BOOTSTRAP"):
        load_settings()


def test_missing_config_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_FILE_ENV, "/nonexistent/lambdalake.toml")
    with pytest.raises(ConfigError, match="does not name a readable file"):
        load_settings()


def test_settings_are_immutable() -> None:
    settings = load_settings()
    with pytest.raises(Exception):  # noqa: B017 (pydantic raises its ValidationError for a frozen field)
        settings.state_dir = Path("/elsewhere")  # type: ignore[misc]


def test_settings_table_covers_every_field() -> None:
    table = settings_table()
    assert len(table) == len(Settings.model_fields)
    assert all(name.startswith("LAMBDALAKE_") and description for name, _, description in table)


def test_cli_reports_config_error_with_exit_code_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMBDALAKE_KAFKA_BOOTSTRAP_SERVERS", "no-port")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lambdalake"), "status"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "LAMBDALAKE_KAFKA_BOOTSTRAP_SERVERS" in result.stderr
    assert "Traceback" not in result.stderr


# --- secrets never reach an error ------------------------------------------------------

API_KEY = "admin:do-not-print-this-key-1234:sql"
PASSWORD = "do-not-print-this-password"


@pytest.mark.parametrize(("variable", "value"), [
    ("LAMBDALAKE_SERVE_MIN_REPLICAS", "5"),  # a model-level rule: its input is every setting
    ("LAMBDALAKE_KAFKA_PARTITIONS", "0"),  # a field rule
])
def test_a_config_error_prints_no_secret(monkeypatch: pytest.MonkeyPatch, variable: str,
                                         value: str) -> None:
    monkeypatch.setenv("LAMBDALAKE_API_KEYS", API_KEY)
    monkeypatch.setenv("LAMBDALAKE_AIRFLOW_PASSWORD", PASSWORD)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    message = str(error.value)
    assert variable in message
    assert "do-not-print" not in message


def test_a_cross_field_error_names_every_variable_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMBDALAKE_SERVE_MIN_REPLICAS", "3")
    monkeypatch.setenv("LAMBDALAKE_SERVE_MAX_REPLICAS", "2")
    with pytest.raises(ConfigError) as error:
        load_settings()
    message = str(error.value)
    assert "LAMBDALAKE_SERVE_MIN_REPLICAS" in message and "LAMBDALAKE_SERVE_MAX_REPLICAS" in message
    assert "(3)" in message and "(2)" in message  # the values are not secret: they help


def test_a_bad_secret_value_is_named_but_not_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "secret.toml"
    config.write_text(f'airflow_password = ["{PASSWORD}"]\n')  # not a string
    monkeypatch.setenv(CONFIG_FILE_ENV, str(config))
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert "LAMBDALAKE_AIRFLOW_PASSWORD" in str(error.value)
    assert PASSWORD not in str(error.value)


def test_a_misspelt_setting_is_named_but_its_value_not_shown(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "typo.toml"
    config.write_text(f'api_key = "{API_KEY}"\n')  # probably a secret: it is not shown
    monkeypatch.setenv(CONFIG_FILE_ENV, str(config))
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert "LAMBDALAKE_API_KEY" in str(error.value)
    assert "do-not-print" not in str(error.value)


def test_the_cli_prints_no_secret_for_a_bad_replica_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMBDALAKE_SERVE_MIN_REPLICAS", "5")
    monkeypatch.setenv("LAMBDALAKE_API_KEYS", API_KEY)
    monkeypatch.setenv("LAMBDALAKE_AIRFLOW_PASSWORD", PASSWORD)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lambdalake"), "status"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "LAMBDALAKE_SERVE_MIN_REPLICAS" in result.stderr
    assert "do-not-print" not in result.stderr + result.stdout


def test_the_airflow_password_has_no_default() -> None:
    """Empty: generated on first `lambdalake up` (infra.airflow.admin_password)."""
    settings = load_settings()
    assert settings.airflow_password.get_secret_value() == ""
    assert settings.airflow_password_path == Path("var").resolve() / "secrets" / "airflow-admin-password"
