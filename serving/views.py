"""The merged views, defined once as SQL that DuckDB and Spark SQL both run.

Every engine provides the same input relations (see `serving/duck.py`, `serving/spark_sql.py`):

    gold.<view>          the batch view's monoid states per (entity, bucket_start_ms), as the
                         latest published batch run wrote them (Delta version pinned)
    batch.boundary       (partition, offset): the highest offset per partition that run includes
    speed.<view>_states  the online store's states of the same view and columns for the events
                         above that boundary (`serving/live.py`: the store's epochs after the
                         run's cut), summed over partitions

and on top of them the views defined here:

    merged.<view>_states  batch states ⊕ live states per (entity, bucket_start_ms), added with
                          each aggregation's own SQL plus (SUM, MAX, MIN): exact, since the
                          run's cut splits the events by Kafka offset and the live states hold
                          exactly the events above it;
    merged.<view>         one row per entity: the states over the view's window and the
                          features derived from them (mean and std of each summed field,
                          events per minute over a window). Each entity's window ends at its
                          own newest bucket (the bucket of its latest event merged): the answer
                          is a function of the data, not of the wall clock, and of that
                          entity's events only, so no single record, however far in the future
                          its time, changes another entity's answer.

Identifiers are quoted per engine (`Dialect.quote`); everything else is SQL both accept.
One entity's merged.<view> row is also computed in Python (`view_row`, for /v1/entities):
each derived feature is defined once in both forms (`Derived`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from lakehouse.features import ViewStates
from lakehouse.monoids import Count, Max, Min, Sum, SumOfSquares
from lakehouse.spec import FeatureView, PlatformSpec
from lakehouse.tables import BUCKET, Lakehouse

WINDOW_END = "window_end_ms"
# the SQL schemas every engine creates (and a query may read from)
SCHEMAS = ("gold", "batch", "speed", "merged", "bronze", "silver", "quarantine", "training", "serving")


@dataclass(frozen=True)
class Dialect:
    name: str
    quote: Callable[[str], str]


DUCKDB = Dialect("duckdb", lambda n: '"' + n.replace('"', '""') + '"')
SPARK = Dialect("spark", lambda n: "`" + n.replace("`", "``") + "`")


def states_name(view: FeatureView) -> str:
    return f"merged.{view.name}_states"


def view_name(view: FeatureView) -> str:
    return f"merged.{view.name}"


def live_name(view: FeatureView) -> str:
    return f"speed.{view.name}_states"


def states_sql(spec: PlatformSpec, view: FeatureView, d: Dialect, *, gold: str | None = None,
               live: str | None = None) -> str:
    """merged.<view>_states: batch states ⊕ live states per (entity, bucket), over the
    relations `gold` and `live` (default gold.<view> and speed.<view>_states)."""
    del spec
    q = d.quote
    names = list(view.aggregations)
    added = ", ".join(
        f"CAST({a.sql_plus}({q(n)}) AS {a.spark_type.upper()}) AS {q(n)}"
        for n, a in view.aggregations.items())
    columns = ", ".join(q(n) for n in names)
    entity = q(view.entity)
    parts = " UNION ALL ".join(
        f"SELECT {entity}, CAST({q(BUCKET)} AS BIGINT) AS {q(BUCKET)}, {columns} FROM {relation}"
        for relation in (gold or f"gold.{view.name}", live or live_name(view)))
    return f"SELECT {entity}, {q(BUCKET)}, {added} FROM ({parts}) AS states GROUP BY {entity}, {q(BUCKET)}"


@dataclass(frozen=True)
class Derived:
    """A feature derived from one row of windowed states, defined once in both forms it is
    computed in: `sql`, a select expression of the merged view (`view_sql`), and `value`, the
    same arithmetic on a Python row (`view_row`: one entity's answer without a query). Each
    form does the same IEEE double operations in the same order, so the two agree exactly."""

    name: str
    sql: str
    value: Callable[[Mapping[str, Any]], Any]


def derived(spec: PlatformSpec, view: FeatureView, d: Dialect) -> list[Derived]:
    """The features derived from a row of (windowed) states: mean and std of each summed
    field, money maxima and minima in currency units, events per minute over a window."""
    q = d.quote
    money = {f.name for f in spec.events.fields if f.type == "money"}
    count = next((n for n, a in view.aggregations.items() if isinstance(a, Count)), None)
    if count is None:
        return []
    n = f"CAST({q(count)} AS DOUBLE)"
    items = []
    for name, aggregation in view.aggregations.items():
        field = aggregation.field
        unit = " / 100" if field in money else ""  # cents → currency units (a DOUBLE)
        per = 100.0 if field in money else 1.0
        if isinstance(aggregation, Sum):
            items.append(Derived(
                f"mean_{field}",
                f"CASE WHEN {q(count)} > 0 THEN CAST({q(name)} AS DOUBLE) / {n}{unit} END",
                partial(_mean, count=count, total=name, per=per)))
            squares = next((s for s, a in view.aggregations.items()
                            if isinstance(a, SumOfSquares) and a.field == field), None)
            if squares is not None:
                total = f"CAST({q(name)} AS DOUBLE)"
                spread = f"{n} * CAST({q(squares)} AS DOUBLE) - {total} * {total}"
                items.append(Derived(
                    f"std_{field}",
                    f"CASE WHEN {q(count)} > 1 THEN SQRT(GREATEST({spread}, 0.0)) / {n}{unit} ELSE 0.0 END",
                    partial(_std, count=count, total=name, squares=squares, per=per)))
        elif isinstance(aggregation, Max | Min) and field in money:
            items.append(Derived(f"{name}_units", f"CAST({q(name)} AS DOUBLE) / 100",
                                 partial(_in_units, name=name)))
    if view.bucket_ms and view.window_buckets:
        minutes = view.bucket_ms * view.window_buckets / 60_000
        items.append(Derived("events_per_minute", f"{n} / {minutes!r}",
                             partial(_per_minute, count=count, minutes=minutes)))
    return items


# the Python forms of `derived`'s SQL, one per kind of derived feature
def _units(value: float, per: float) -> float:
    return value / per if per != 1.0 else value


def _mean(row: Mapping[str, Any], *, count: str, total: str, per: float) -> float | None:
    return _units(float(row[total]) / float(row[count]), per) if row[count] > 0 else None


def _std(row: Mapping[str, Any], *, count: str, total: str, squares: str, per: float) -> float:
    if row[count] <= 1:
        return 0.0
    n, t = float(row[count]), float(row[total])
    return _units(math.sqrt(max(n * float(row[squares]) - t * t, 0.0)) / n, per)


def _in_units(row: Mapping[str, Any], *, name: str) -> float | None:
    return None if row[name] is None else float(row[name]) / 100


def _per_minute(row: Mapping[str, Any], *, count: str, minutes: float) -> float:
    return float(row[count]) / minutes


def derived_columns(spec: PlatformSpec, view: FeatureView, d: Dialect) -> list[str]:
    """SQL select items of the features derived from a row of (windowed) states."""
    return [f"{item.sql} AS {d.quote(item.name)}" for item in derived(spec, view, d)]


def view_row(spec: PlatformSpec, view: FeatureView, entity: Any,
             states: ViewStates) -> dict[str, Any] | None:
    """One entity's row of merged.<view> computed in Python from its states (`states`: that
    entity's buckets, gold ⊕ live), column for column what `view_sql` answers for it: the
    states over the window ending at its newest bucket, the window's end, the derived
    features (`derived`). None: nothing is known of the entity."""
    buckets = [bucket for (e, bucket), _ in states.items() if e == entity]
    if not buckets:
        return None
    newest = max(buckets)
    row: dict[str, Any] = {view.entity: entity,
                           **dict(zip(view.aggregations, states.read_values(entity, newest), strict=True))}
    if view.bucket_ms and view.window_buckets:
        row[WINDOW_END] = newest
    for item in derived(spec, view, DUCKDB):
        row[item.name] = item.value(row)
    return row


def view_sql(spec: PlatformSpec, view: FeatureView, d: Dialect, *, states: str | None = None) -> str:
    """merged.<view>: per entity, the states over its window and the derived features, over
    the relation `states` (default merged.<view>_states)."""
    q = d.quote
    entity = q(view.entity)
    states = states or states_name(view)
    added = ", ".join(
        f"CAST({a.sql_plus}(s.{q(n)}) AS {a.spark_type.upper()}) AS {q(n)}"
        for n, a in view.aggregations.items())
    if view.bucket_ms and view.window_buckets:
        span = view.bucket_ms * view.window_buckets
        # each entity's window ends at its own newest bucket (see the module docstring)
        windowed = (
            f"SELECT s.{entity}, {added}, MAX(c.{q(WINDOW_END)}) AS {q(WINDOW_END)} "
            f"FROM {states} s JOIN (SELECT {entity}, MAX({q(BUCKET)}) AS {q(WINDOW_END)} "
            f"FROM {states} GROUP BY {entity}) c ON s.{entity} = c.{entity} "
            f"WHERE s.{q(BUCKET)} > c.{q(WINDOW_END)} - {span} GROUP BY s.{entity}"
        )
    else:
        windowed = f"SELECT s.{entity}, {added} FROM {states} s GROUP BY s.{entity}"
    derived = derived_columns(spec, view, d)
    return f"SELECT w.*{''.join(', ' + item for item in derived)} FROM ({windowed}) AS w"


def merged_views(spec: PlatformSpec, d: Dialect) -> dict[str, str]:
    """Qualified name → SQL of every merged relation, in creation order."""
    out: dict[str, str] = {}
    for view in spec.views:
        out[states_name(view)] = states_sql(spec, view, d)
    for view in spec.views:
        out[view_name(view)] = view_sql(spec, view, d)
    return out


def raw_tables(spec: PlatformSpec, lakehouse: Lakehouse) -> dict[str, str]:
    """The raw tables both engines expose read-only, qualified name → Delta path: every table
    of the lakehouse but gold, which is read only at the versions of a published run."""
    out = {}
    for name, path in lakehouse.delta_tables(spec).items():
        area, table = name.split("/", 1)
        if area != "gold":
            out[f"{area}.{re.sub(r'[^A-Za-z0-9_]', '_', table)}"] = path
    return out
