"""Kafka access shared by every layer: topic creation and clients configured from settings.

Every Kafka client of lambdalake takes its connection from here: kafka-python's clients
(consumers, producers, admin) from `kafka_client_config`, Spark's Kafka source from
`spark_kafka_options`. Both say the same thing, from the same settings: the bootstrap list,
the security protocol, TLS trust (a PEM CA file, else the system's store) and SASL
credentials. They hold the SASL password in clear, for the client: never log them.

Messages are keyed by the entity of the record (see `RecordSchema.key_field`); kafka-python's
default partitioner hashes keys with murmur2 exactly as the Java client does, so one entity's
events land in one partition, in order, whichever client produced them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.partitioner.default import murmur2

from lakehouse.config import Settings
from lakehouse.errors import ServiceError

_JAAS_LOGIN_MODULES = {
    "PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
    "SCRAM-SHA-256": "org.apache.kafka.common.security.scram.ScramLoginModule",
    "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule",
}


@functools.lru_cache(maxsize=1 << 16)
def home_partition(key: str, partitions: int) -> int:
    """The partition that Kafka's default partitioner (the Java client's and kafka-python's;
    librdkafka's `murmur2_random`) gives a record keyed by `key` (as UTF-8) among
    `partitions`."""
    hashed: int = murmur2(key.encode())
    return (hashed & 0x7FFFFFFF) % partitions


def bootstrap_list(bootstrap_servers: str) -> list[str]:
    return [server.strip() for server in bootstrap_servers.split(",") if server.strip()]


def kafka_client_config(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of every kafka-python client (KafkaConsumer, KafkaProducer,
    KafkaAdminClient): where the brokers are and how to authenticate to them."""
    protocol = settings.kafka_security_protocol
    config: dict[str, Any] = {"bootstrap_servers": bootstrap_list(settings.kafka_bootstrap_servers),
                              "security_protocol": protocol}
    if protocol.endswith("SSL") and settings.kafka_ssl_cafile is not None:
        config["ssl_cafile"] = str(settings.kafka_ssl_cafile)
    if protocol.startswith("SASL_"):
        config["sasl_mechanism"] = settings.kafka_sasl_mechanism
        config["sasl_plain_username"] = settings.kafka_sasl_username
        config["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return config


def _jaas_quoted(value: str) -> str:
    """A JAAS option value: Kafka's parser reads a quoted string with backslash escapes."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def spark_kafka_options(settings: Settings) -> dict[str, str]:
    """Security options of Spark's Kafka source (`kafka.`-prefixed Kafka consumer configs),
    the same connection as `kafka_client_config`; the bootstrap servers are given apart
    (`kafka.bootstrap.servers`). The CA file is read by the executors, so it must exist at
    that path on them too. Spark redacts the JAAS config (it contains "password") in its plans
    and UI."""
    protocol = settings.kafka_security_protocol
    options: dict[str, str] = {"kafka.security.protocol": protocol}
    if protocol.endswith("SSL") and settings.kafka_ssl_cafile is not None:
        options["kafka.ssl.truststore.type"] = "PEM"
        options["kafka.ssl.truststore.location"] = str(settings.kafka_ssl_cafile)
    if protocol.startswith("SASL_") and settings.kafka_sasl_mechanism is not None:
        module = _JAAS_LOGIN_MODULES[settings.kafka_sasl_mechanism]
        options["kafka.sasl.mechanism"] = settings.kafka_sasl_mechanism
        options["kafka.sasl.jaas.config"] = (
            f"{module} required username={_jaas_quoted(settings.kafka_sasl_username)} "
            f"password={_jaas_quoted(settings.kafka_sasl_password.get_secret_value())};")
    return options


def _connection(kafka: Settings | str) -> dict[str, Any]:
    """kafka-python connection arguments from the settings, or from a bare bootstrap list
    (a PLAINTEXT broker: the local platform, tests)."""
    if isinstance(kafka, Settings):
        return kafka_client_config(kafka)
    return {"bootstrap_servers": bootstrap_list(kafka)}


def _servers(kafka: Settings | str) -> str:
    return kafka.kafka_bootstrap_servers if isinstance(kafka, Settings) else kafka


def _admin(kafka: Settings | str) -> KafkaAdminClient:
    """An admin client, or ServiceError saying Kafka cannot be reached."""
    config = {**_connection(kafka), "client_id": "lambdalake-admin", "request_timeout_ms": 15000}
    try:
        return KafkaAdminClient(**config)
    except (KafkaError, OSError) as exc:
        raise ServiceError(
            f"cannot reach Kafka at {_servers(kafka)} ({exc}): is the platform up? "
            "(`lambdalake up`)"
        ) from None


def ensure_topics(kafka: Settings | str, topics: Iterable[str], *, partitions: int,
                  replication_factor: int = 1) -> list[str]:
    """Create the topics that do not exist yet; return the names created. Idempotent.
    `kafka`: the settings (their bootstrap list and security), or a PLAINTEXT bootstrap list."""
    admin = _admin(kafka)
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            try:
                admin.create_topics(
                    [NewTopic(t, num_partitions=partitions, replication_factor=replication_factor)
                     for t in missing]
                )
            except TopicAlreadyExistsError:
                pass  # created concurrently by another process: the goal is reached
        return missing
    finally:
        admin.close()


def topic_partitions(kafka: Settings | str, topic: str) -> int:
    """How many partitions `topic` has; 0 where it does not exist. `kafka`: the settings, or
    a PLAINTEXT bootstrap list (as for `ensure_topics`)."""
    admin = _admin(kafka)
    try:
        if topic not in set(admin.list_topics()):
            return 0
        described = admin.describe_topics([topic])
    except (KafkaError, OSError) as exc:
        raise ServiceError(f"cannot describe Kafka topic {topic} at {_servers(kafka)}: {exc}") from None
    finally:
        admin.close()
    for entry in described:  # one metadata entry per topic asked (an error code if it vanished)
        if entry.get("name") == topic and not entry.get("error_code"):
            return len(entry.get("partitions") or [])
    return 0


def producer(kafka: Settings | str, **options: object) -> KafkaProducer:
    """A producer that waits for the broker's acknowledgement of every record. `kafka`: the
    settings, or a PLAINTEXT bootstrap list (as for `ensure_topics`)."""
    config: dict[str, object] = {
        **_connection(kafka),
        "acks": "all",
        "linger_ms": 5,
        "batch_size": 256 * 1024,
        "compression_type": None,
        "client_id": "lambdalake",
    }
    config.update(options)
    try:
        return KafkaProducer(**config)
    except (KafkaError, OSError) as exc:
        raise ServiceError(
            f"cannot reach Kafka at {_servers(kafka)} ({exc}): is the platform up? "
            "(`lambdalake up`)"
        ) from None
