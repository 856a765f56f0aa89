"""Prometheus metrics of the speed layer (served by `lambdalake speed run --metrics-port`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

EVENTS = Counter("lambdalake_speed_events_total", "Records handled, by outcome", ["outcome"])
BATCH_SIZE = Histogram("lambdalake_speed_batch_records", "Records per micro-batch",
                       buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000))
SCORING_LATENCY = Histogram("lambdalake_speed_scoring_seconds",
                            "Model service call per micro-batch",
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
END_TO_END = Histogram("lambdalake_speed_end_to_end_seconds",
                       "From the Kafka record timestamp to its online-store step",
                       buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.35, 0.5, 0.75, 1, 2.5, 5,
                                10, 30))
LAG = Gauge("lambdalake_speed_consumer_lag", "Records behind the log end", ["partition"])
MODEL_VERSION = Gauge("lambdalake_speed_model_version", "Model version of the latest score")
OWNED_PARTITIONS = Gauge("lambdalake_speed_partitions", "Partitions this member owns")
BATCH_RUN = Info("lambdalake_speed_batch_run", "The batch run whose views the state is built on")
STORE_UP = Gauge("lambdalake_speed_online_store_up", "1 while the online store answers, 0 while it does not")
FLUSH_LATENCY = Histogram("lambdalake_speed_flush_seconds", "One append of the outbox to Delta scored_events",
                          buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
BATCH_PHASE = Histogram("lambdalake_speed_batch_phase_seconds",
                        "Wall time of each phase of a micro-batch: parse (validation), read (the windows "
                        "and the online store read, with the dedup look-up), features, step (the store's atomic "
                        "steps; the model service scores the batch meanwhile, lambdalake_speed_scoring_seconds)",
                        ["phase"],
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
