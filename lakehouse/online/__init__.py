"""The online store: the speed layer's real-time view, which serving reads fresh.

One module per backend, as Feast keeps them: `base` is the contract (`OnlineStore`: exactly-
once steps per Kafka partition, epochs cut by batch runs, reads as of a coverage vector);
`redis_store` implements it on any Redis-protocol server.
"""

import hashlib

from lakehouse.config import Settings
from lakehouse.online.base import OnlineStore
from lakehouse.online.redis_store import RedisOnlineStore
from lakehouse.spec import PlatformSpec

__all__ = ["base", "open_store", "redis_store"]


def open_store(settings: Settings, spec: PlatformSpec, *, group: str | None = None,
               root: str | None = None) -> OnlineStore:
    """The online store the settings name, holding the increments of a speed group (default:
    the settings' `speed_group`) above the batch runs of one lakehouse (its Delta root,
    default the settings'): the store's keys are named after both, since its epochs are cut
    by that lakehouse's runs."""
    password = settings.online_store_password.get_secret_value() or None
    lake = (root or settings.delta_uri).rstrip("/")
    prefix = f"lambdalake:{hashlib.sha256(lake.encode()).hexdigest()[:10]}"
    return RedisOnlineStore(spec, group or settings.speed_group, settings.online_store_uri, password=password,
                            prefix=prefix)
