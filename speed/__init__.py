"""The speed layer: the Kafka consumer group that scores events as they arrive
(`consumer`), the Ray Serve model application every score goes through
(`model_service`), and the re-derivation of its online store (`rebuild`). Others reach the
running service through `lakehouse.serve`.
"""

__all__ = ["consumer", "model_service", "rebuild"]
