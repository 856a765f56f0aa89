"""The one map from spec field types to storage types: Arrow (Delta tables, written by Spark
and delta-rs alike, read by DuckDB, which takes its types from Arrow) and Spark SQL (for the
typed empty relations the SQL engine declares before a table exists).

    spec        Arrow                   Spark SQL
    string      string                  STRING
    long        int64                   BIGINT
    double      float64                 DOUBLE
    money       int64 (integer cents)   BIGINT
    boolean     bool                    BOOLEAN
    timestamp   timestamp[us, UTC]      TIMESTAMP   (whole milliseconds; microseconds are
                                                     Spark's precision)
"""

from __future__ import annotations

import pyarrow as pa

from lakehouse.monoids import Aggregation
from lakehouse.spec import FieldSpec, RecordSchema

__all__ = ["ARROW_TYPES", "SPARK_SQL_TYPES", "arrow_type", "spark_sql_type", "state_arrow_type",
           "typed_arrow_schema"]

# spec type → (Arrow type, Spark SQL type)
_TYPES: dict[str, tuple[pa.DataType, str]] = {
    "string": (pa.string(), "STRING"),
    "long": (pa.int64(), "BIGINT"),
    "double": (pa.float64(), "DOUBLE"),
    "money": (pa.int64(), "BIGINT"),
    "boolean": (pa.bool_(), "BOOLEAN"),
    "timestamp": (pa.timestamp("us", tz="UTC"), "TIMESTAMP"),
}
ARROW_TYPES: dict[str, pa.DataType] = {name: arrow for name, (arrow, _) in _TYPES.items()}
SPARK_SQL_TYPES: dict[str, str] = {name: spark for name, (_, spark) in _TYPES.items()}


def arrow_type(field: FieldSpec) -> pa.DataType:
    return ARROW_TYPES[field.type]


# a monoid state's SQL type (`Aggregation.spark_type`) → its Arrow type (gold tables read by
# DuckDB and delta-rs): counts, sums, extremes in 64 bits; sums of squares beyond them
_STATE_ARROW_TYPES: dict[str, pa.DataType] = {"bigint": pa.int64(), "decimal(38,0)": pa.decimal128(38, 0)}


def state_arrow_type(aggregation: Aggregation) -> pa.DataType:
    return _STATE_ARROW_TYPES[aggregation.spark_type]


def spark_sql_type(field: FieldSpec) -> str:
    return SPARK_SQL_TYPES[field.type]


def typed_arrow_schema(schema: RecordSchema) -> pa.Schema:
    """A record's typed fields, in spec order, as every table that holds them stores them."""
    return pa.schema([pa.field(f.name, arrow_type(f)) for f in schema.fields])
