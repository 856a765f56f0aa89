"""Kafka access shared by every layer: topic creation and clients configured from settings.

Messages are keyed by the entity of the record (see `RecordSchema.key_field`); kafka-python's
default partitioner hashes keys with murmur2 exactly as the Java client does, so one entity's
events land in one partition, in order, whichever client produced them.
"""

from __future__ import annotations

from collections.abc import Iterable

from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from lakehouse.errors import ServiceError


def bootstrap_list(bootstrap_servers: str) -> list[str]:
    return [server.strip() for server in bootstrap_servers.split(",") if server.strip()]


def ensure_topics(bootstrap_servers: str, topics: Iterable[str], *, partitions: int,
                  replication_factor: int = 1) -> list[str]:
    """Create the topics that do not exist yet; return the names created. Idempotent."""
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap_list(bootstrap_servers),
                                 client_id="lambdalake-admin", request_timeout_ms=15000)
    except (KafkaError, OSError) as exc:
        raise ServiceError(
            f"cannot reach Kafka at {bootstrap_servers} ({exc}): is the platform up? "
            "(`lambdalake up`)"
        ) from None
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


def producer(bootstrap_servers: str, **options: object) -> KafkaProducer:
    """A producer that waits for the broker's acknowledgement of every record."""
    config: dict[str, object] = {
        "bootstrap_servers": bootstrap_list(bootstrap_servers),
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
            f"cannot reach Kafka at {bootstrap_servers} ({exc}): is the platform up? "
            "(`lambdalake up`)"
        ) from None
