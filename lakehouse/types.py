"""The one map from spec field types to storage types: Arrow (Delta tables, written by Spark
and delta-rs alike, read by DuckDB) and, through Arrow, Spark SQL and DuckDB.

    string → string     long → int64     double → float64     boolean → bool
    money → int64 (integer cents)        timestamp → timestamp[us, UTC] (whole milliseconds;
                                          microseconds are Spark's precision)
"""

from __future__ import annotations

import pyarrow as pa

from lakehouse.spec import FieldSpec, RecordSchema

__all__ = ["ARROW_TYPES", "arrow_type", "typed_arrow_schema"]

ARROW_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "long": pa.int64(),
    "double": pa.float64(),
    "money": pa.int64(),
    "boolean": pa.bool_(),
    "timestamp": pa.timestamp("us", tz="UTC"),
}


def arrow_type(field: FieldSpec) -> pa.DataType:
    return ARROW_TYPES[field.type]


def typed_arrow_schema(schema: RecordSchema) -> pa.Schema:
    """A record's typed fields, in spec order, as every table that holds them stores them."""
    return pa.schema([pa.field(f.name, arrow_type(f)) for f in schema.fields])
