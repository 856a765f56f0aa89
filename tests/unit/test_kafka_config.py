"""Kafka client security: the settings that say how lambdalake's clients connect (TLS, SASL),
checked together, and the two builders every client takes its connection from (kafka-python
and Spark's Kafka source)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from lakehouse.config import load_settings
from lakehouse.errors import ConfigError
from lakehouse.streams import kafka_client_config, spark_kafka_options

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "do-not-print-this-kafka-password"
SASL_SSL = {
    "kafka_bootstrap_servers": "kafka-0:9093, kafka-1:9093",
    "manage_kafka": False,
    "kafka_security_protocol": "SASL_SSL",
    "kafka_sasl_mechanism": "SCRAM-SHA-512",
    "kafka_sasl_username": "speed-layer",
    "kafka_sasl_password": PASSWORD,
    "kafka_ssl_cafile": "/etc/lambdalake/kafka-ca/ca.crt",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("LAMBDALAKE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no ./lambdalake.toml


def test_the_local_platform_connects_in_plaintext() -> None:
    settings = load_settings()
    assert settings.kafka_security_protocol == "PLAINTEXT"
    assert kafka_client_config(settings) == {"bootstrap_servers": ["127.0.0.1:9092"],
                                             "security_protocol": "PLAINTEXT"}
    assert spark_kafka_options(settings) == {"kafka.security.protocol": "PLAINTEXT"}


def test_sasl_over_tls_for_kafka_python() -> None:
    settings = load_settings(**SASL_SSL)
    assert kafka_client_config(settings) == {
        "bootstrap_servers": ["kafka-0:9093", "kafka-1:9093"],
        "security_protocol": "SASL_SSL",
        "ssl_cafile": "/etc/lambdalake/kafka-ca/ca.crt",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "speed-layer",
        "sasl_plain_password": PASSWORD,
    }


def test_sasl_over_tls_for_sparks_kafka_source() -> None:
    settings = load_settings(**SASL_SSL)
    assert spark_kafka_options(settings) == {
        "kafka.security.protocol": "SASL_SSL",
        "kafka.ssl.truststore.type": "PEM",
        "kafka.ssl.truststore.location": "/etc/lambdalake/kafka-ca/ca.crt",
        "kafka.sasl.mechanism": "SCRAM-SHA-512",
        "kafka.sasl.jaas.config": 'org.apache.kafka.common.security.scram.ScramLoginModule required '
                                  f'username="speed-layer" password="{PASSWORD}";',
    }


def test_tls_without_a_ca_file_trusts_the_system_store_and_plain_sasl_has_its_module() -> None:
    settings = load_settings(**{**SASL_SSL, "kafka_ssl_cafile": None, "kafka_sasl_mechanism": "PLAIN",
                                "kafka_sasl_password": 'a "quoted" \\ word'})
    assert "ssl_cafile" not in kafka_client_config(settings)
    options = spark_kafka_options(settings)
    assert not any(key.startswith("kafka.ssl.") for key in options)
    # JAAS quotes its values: a quote or backslash in a password is escaped, not a syntax error
    assert options["kafka.sasl.jaas.config"] == (
        'org.apache.kafka.common.security.plain.PlainLoginModule required '
        'username="speed-layer" password="a \\"quoted\\" \\\\ word";')


def test_tls_alone_sends_no_sasl_options() -> None:
    settings = load_settings(**{**{k: v for k, v in SASL_SSL.items() if "sasl" not in k},
                                "kafka_security_protocol": "SSL"})
    assert kafka_client_config(settings) == {"bootstrap_servers": ["kafka-0:9093", "kafka-1:9093"],
                                             "security_protocol": "SSL",
                                             "ssl_cafile": "/etc/lambdalake/kafka-ca/ca.crt"}
    assert spark_kafka_options(settings) == {"kafka.security.protocol": "SSL",
                                             "kafka.ssl.truststore.type": "PEM",
                                             "kafka.ssl.truststore.location": "/etc/lambdalake/kafka-ca/ca.crt"}


@pytest.mark.parametrize(("change", "variables"), [
    ({"kafka_sasl_password": ""}, ["LAMBDALAKE_KAFKA_SASL_PASSWORD"]),
    ({"kafka_sasl_username": "", "kafka_sasl_mechanism": None},
     ["LAMBDALAKE_KAFKA_SASL_MECHANISM", "LAMBDALAKE_KAFKA_SASL_USERNAME"]),
    ({"kafka_security_protocol": "PLAINTEXT", "kafka_ssl_cafile": None},  # SASL set, never sent
     ["LAMBDALAKE_KAFKA_SECURITY_PROTOCOL", "LAMBDALAKE_KAFKA_SASL_MECHANISM"]),
    ({"kafka_security_protocol": "SASL_PLAINTEXT"},  # a CA file no TLS would use
     ["LAMBDALAKE_KAFKA_SECURITY_PROTOCOL", "LAMBDALAKE_KAFKA_SSL_CAFILE"]),
    ({"manage_kafka": True},  # the broker `lambdalake up` starts has a PLAINTEXT listener only
     ["LAMBDALAKE_MANAGE_KAFKA", "LAMBDALAKE_KAFKA_SECURITY_PROTOCOL"]),
])
def test_security_settings_that_do_not_fit_together_name_the_variables(change, variables) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(**{**SASL_SSL, **change})
    message = str(error.value)
    assert all(variable in message for variable in variables), message
    assert PASSWORD not in message


def test_the_sasl_password_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMBDALAKE_KAFKA_SASL_PASSWORD", PASSWORD)
    with pytest.raises(ConfigError) as error:
        load_settings(kafka_security_protocol="SASL_SSL", manage_kafka=False)
    assert "LAMBDALAKE_KAFKA_SASL_MECHANISM" in str(error.value)
    assert PASSWORD not in str(error.value)
    with pytest.raises(ConfigError) as error:  # a bad value of the password itself
        load_settings(**{**SASL_SSL, "kafka_sasl_password": [PASSWORD]})
    assert "LAMBDALAKE_KAFKA_SASL_PASSWORD" in str(error.value) and PASSWORD not in str(error.value)
    settings = load_settings(**SASL_SSL)
    assert PASSWORD not in repr(settings) and PASSWORD not in str(settings)


KAFKA_CLIENTS = {"KafkaConsumer", "KafkaProducer", "KafkaAdminClient"}


def _client_calls() -> list[tuple[str, int, ast.Call]]:
    calls = []
    for package in ("lakehouse", "batch", "speed", "serving", "infra", "dags"):
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) in KAFKA_CLIENTS:
                    calls.append((str(path.relative_to(REPO)), node.lineno, node))
    return calls


def test_every_kafka_python_client_takes_its_connection_from_the_one_builder() -> None:
    """No client splits the bootstrap list by hand or leaves the security settings out: each
    is built with `**kafka_client_config(settings)` (lakehouse.streams' own through it)."""
    calls = _client_calls()
    assert len(calls) >= 5, calls
    by_hand = []
    for file, line, call in calls:
        spread = [k.value for k in call.keywords if k.arg is None]
        named = {k.arg for k in call.keywords}
        from_builder = any(isinstance(node, ast.Call) and getattr(node.func, "id", "") == "kafka_client_config"
                           for value in spread for node in ast.walk(value))
        if file == "lakehouse/streams.py":
            from_builder = bool(spread)  # config dicts made by kafka_client_config / _connection
        if not from_builder or "bootstrap_servers" in named:
            by_hand.append(f"{file}:{line}")
    assert by_hand == []
