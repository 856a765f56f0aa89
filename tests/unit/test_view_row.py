"""The merged views' two forms agree: `view_row` (Python, one entity, what /v1/entities
answers) equals `view_sql` (what DuckDB and Spark run as merged.<view>) column for column,
on states drawn at random, for every view of the shipped spec. DuckDB runs in-process here:
a library, no service."""

from __future__ import annotations

from typing import Any

import duckdb
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from lakehouse.features import ViewStates
from lakehouse.fraud import FRAUD_SPEC as SPEC
from lakehouse.monoids import Count, Max, Min, SumOfSquares
from lakehouse.spec import FeatureView
from lakehouse.tables import BUCKET
from serving.duck import entity_types
from serving.live import live_schema
from serving.views import DUCKDB, view_row, view_sql

ENTITIES = ["e1", "e2", "e3"]


def _states(view: FeatureView, draw: Any) -> list[tuple[str, int, list[Any]]]:
    """(entity, bucket start, states) rows: a few entities, buckets spread wider than the window."""
    bucket_ms = view.bucket_ms or 1
    rows = []
    for entity in ENTITIES:
        buckets = draw(st.sets(st.integers(0, 3 * (view.window_buckets or 4)), max_size=8))
        for b in sorted(buckets):
            count = draw(st.integers(1, 50))
            amounts = draw(st.lists(st.integers(-10**9, 10**9), min_size=count, max_size=count))
            values = []
            for aggregation in view.aggregations.values():
                if isinstance(aggregation, SumOfSquares):
                    values.append(sum(a * a for a in amounts))
                elif isinstance(aggregation, Min):
                    values.append(min(amounts))
                elif isinstance(aggregation, Max):
                    values.append(max(amounts))
                elif isinstance(aggregation, Count):
                    values.append(count)
                else:
                    values.append(sum(amounts))
            rows.append((entity, b * bucket_ms, values))
    return rows


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_view_row_equals_the_merged_views_sql(data: st.DataObject) -> None:
    db = duckdb.connect(":memory:")
    types = entity_types(SPEC)
    for view in SPEC.views:
        rows = _states(view, data.draw)
        schema = live_schema(SPEC, view, types[view.entity])
        names = list(view.aggregations)
        table = pa.Table.from_pylist(
            [{view.entity: e, BUCKET: b, **dict(zip(names, v, strict=True))} for e, b, v in rows], schema=schema)
        db.register("states", table)
        result = db.execute(f"SELECT * FROM ({view_sql(SPEC, view, DUCKDB, states='states')}) AS v")
        columns = [d[0] for d in result.description]
        by_sql = {row[0]: dict(zip(columns, row, strict=True)) for row in result.fetchall()}
        db.unregister("states")
        for entity in ENTITIES:
            states = ViewStates(view)
            for e, b, v in rows:
                if e == entity:
                    states.merge_values(e, b, v)
            python = view_row(SPEC, view, entity, states)
            expected = by_sql.get(entity)
            if expected is None:
                assert python is None
                continue
            assert python is not None and list(python) == columns, (view.name, list(python or {}), columns)
            for name in columns:  # exact, floats included: the same operations in the same order
                assert python[name] == (int(expected[name]) if name in view.aggregations else expected[name]), \
                    (view.name, entity, name, python[name], expected[name])
