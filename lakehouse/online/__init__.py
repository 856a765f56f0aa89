"""The online store: the speed layer's real-time view, which serving reads fresh.

One module per backend, as Feast keeps them: `base` is the contract (`OnlineStore`: exactly-
once steps per Kafka partition, epochs cut by batch runs, reads as of a coverage vector);
`redis_store` implements it on any Redis-protocol server.
"""

__all__ = ["base", "redis_store"]
