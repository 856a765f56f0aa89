"""The batch layer: Spark jobs over the Delta lakehouse (ingest, validate, views, training
set, training, drift, maintenance). Above it, the CLI and the Airflow DAGs call `jobs`, the
one wiring of every job; the layer's other modules are its own.
"""

__all__ = ["jobs"]
