"""The online store: the speed layer's real-time view, which serving reads fresh.

One module per backend, as Feast keeps them: `base` is the contract (`OnlineStore`: exactly-
once steps per Kafka partition, epochs cut by batch runs, reads as of a coverage vector);
`redis_store` implements it on any Redis-protocol server.
"""

from lakehouse.config import Settings
from lakehouse.online.base import OnlineStore
from lakehouse.online.redis_store import RedisOnlineStore
from lakehouse.spec import PlatformSpec

__all__ = ["base", "open_store", "redis_store"]


def open_store(settings: Settings, spec: PlatformSpec) -> OnlineStore:
    """The online store the settings name, holding the speed group's increments."""
    password = settings.online_store_password.get_secret_value() or None
    return RedisOnlineStore(spec, settings.speed_group, settings.online_store_uri, password=password)
