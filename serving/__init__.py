"""The serving layer: the exact merged views of batch and speed, as SQL (`duck`,
`spark_sql`) and as the HTTP API (`api`, run by `server`), and `verify`, the check that the
merged views equal a recomputation from Kafka.
"""

__all__ = ["api", "duck", "server", "spark_sql", "verify"]
