"""The merged views on Spark SQL, for data that outgrows one machine (`--engine spark`).

The same relations as the DuckDB engine, under the same names, as catalog objects of the
session: each Delta table is an external table in the hidden database `lake_tables`, and
`gold.<view>` pins the version the published run wrote (`VERSION AS OF`). `speed.<view>_states`
are the online store's live states above the run's cut (`serving/live.py`), reloaded whole
at each `register` (`live_tables`: every live state, however few changed since) and written
as managed tables of the hidden database; unlike the DuckDB engine, which catches up from
the store's changes, this engine's `register` costs the live states, which grow with the
uptime since the run. The `merged.*` views are `serving/views.py`'s SQL, unchanged but for
identifier quoting.

User queries are parsed as queries only (`parseQuery`: no DDL, DML, SET or CACHE) and run
with `spark.sql.runSQLOnFiles=false`, so ``csv.`/path` `` and the like cannot read files, and
`spark.sql.variable.substitute=false`, so `${env:...}` or `${spark...}` in a query stays text
(the parser would otherwise put environment variables and settings in it). Their analyzed
plan, which is what runs, must call no Java method (`reflect`, `java_method`, `try_reflect`,
by any name, `IDENTIFIER(...)` included) and run no program (`TRANSFORM ... USING`); the
bodies of our own views are not searched. Both settings are the session's again afterwards.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from lakehouse.config import setting_default
from lakehouse.errors import SqlError
from lakehouse.features import OFFSET, PARTITION
from lakehouse.online.base import OnlineStore
from lakehouse.spec import PlatformSpec
from lakehouse.tables import BUCKET, Lakehouse, RunLog
from lakehouse.types import arrow_type, spark_sql_type
from serving.duck import Snapshot
from serving.live import LiveSource, adoptable, live_tables
from serving.views import SCHEMAS, SPARK, live_name, merged_views, raw_tables

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

HIDDEN = "lake_tables"

# Catalyst classes (simple names) a served query must not contain, and why
REFUSED_NODES = {
    "CallMethodViaReflection": "reflect/java_method/try_reflect (calls any Java method)",
    "ScriptTransformation": "TRANSFORM ... USING (runs a program on the server)",
}
_QUERY_SETTINGS = {"spark.sql.runSQLOnFiles": "false", "spark.sql.variable.substitute": "false"}


def _q(name: str) -> str:
    return SPARK.quote(name)


def _literal(path: str) -> str:
    return "'" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"


class SparkEngine:
    def __init__(self, spark: SparkSession, spec: PlatformSpec, lakehouse: Lakehouse, *,
                 store: OnlineStore | None, partitions: int = 1) -> None:
        self.spark = spark
        self.spec = spec
        self.lakehouse = lakehouse
        self._run_log = RunLog(lakehouse)
        self.store = store
        self.partitions = partitions
        logging.getLogger("SQLQueryContextLogger").setLevel(logging.CRITICAL)  # errors are raised

    def _table(self, name: str, path: str) -> str | None:
        """An external catalog table over a Delta path (None where no table exists yet)."""
        from delta.tables import DeltaTable

        if not DeltaTable.isDeltaTable(self.spark, path):
            return None
        hidden = f"{HIDDEN}.{name.replace('.', '__')}"
        self.spark.sql(f"CREATE TABLE IF NOT EXISTS {hidden} USING delta LOCATION {_literal(path)}")
        self.spark.sql(f"REFRESH TABLE {hidden}")
        return hidden

    def register(self) -> Snapshot:
        """(Re)create every relation at the latest published run and scored events."""
        previous = self.spark.conf.get("spark.sql.runSQLOnFiles")
        self.spark.conf.set("spark.sql.runSQLOnFiles", "true")
        try:
            return self._register()
        finally:  # whatever failed: user queries must not find files readable
            self.spark.conf.set("spark.sql.runSQLOnFiles", previous if previous is not None else "false")

    def _register(self) -> Snapshot:
        spark, spec, lake = self.spark, self.spec, self.lakehouse
        for schema in (HIDDEN, *SCHEMAS):
            spark.sql(f"CREATE DATABASE IF NOT EXISTS {schema}")
        runs = [r for r in self._run_log.runs() if adoptable(r, spec, self.store)]
        run = runs[0] if runs else None
        boundary = run.boundary if run else {}
        for view in spec.views:
            hidden = self._table(f"gold.{view.name}", lake.gold(view.name))
            if run is None or hidden is None:
                columns = ", ".join(
                    [f"CAST(NULL AS {self._field_types[view.entity]}) AS {_q(view.entity)}",
                     f"CAST(NULL AS BIGINT) AS {_q(BUCKET)}"]
                    + [f"CAST(NULL AS {a.spark_type.upper()}) AS {_q(n)}" for n, a in view.aggregations.items()])
                spark.sql(f"CREATE OR REPLACE VIEW gold.{view.name} AS SELECT {columns} WHERE false")
            else:
                spark.sql(f"CREATE OR REPLACE VIEW gold.{view.name} AS SELECT * FROM {hidden} "
                          f"VERSION AS OF {run.view_versions[view.name]}")
        rows = ", ".join(f"({p}, {o})" for p, o in sorted(boundary.items())) or "(-1, -1)"
        spark.sql(f"CREATE OR REPLACE VIEW batch.boundary AS SELECT * FROM VALUES {rows} "
                  f"AS t({_q(PARTITION)}, {_q(OFFSET)}) WHERE {_q(PARTITION)} >= 0")
        live = live_tables(LiveSource(self.store, self.partitions, run.cut_epochs if run else {}), spec,
                           {v.entity: arrow_type(next(f for f in spec.events.fields if f.name == v.entity))
                            for v in spec.views})
        for view in spec.views:
            hidden = f"{HIDDEN}.speed__{view.name}_states"
            frame = spark.createDataFrame(live.tables[view.name])  # Arrow: exact DECIMAL(38,0) states
            frame.write.mode("overwrite").saveAsTable(hidden)
            spark.sql(f"CREATE OR REPLACE VIEW {live_name(view)} AS SELECT * FROM {hidden}")
        for name, sql in merged_views(spec, SPARK).items():
            spark.sql(f"CREATE OR REPLACE VIEW {name} AS {sql}")
        for name, path in raw_tables(self.spec, self.lakehouse).items():
            hidden_raw = self._table(name, path)
            if hidden_raw is not None:
                spark.sql(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM {hidden_raw}")
        return Snapshot(run.run_id if run else None, dict(boundary), {**boundary, **live.coverage}, live.states)

    @property
    def _field_types(self) -> dict[str, str]:
        return {f.name: spark_sql_type(f) for f in self.spec.events.fields}

    def query(self, sql: str, *, row_cap: int = setting_default("sql_row_cap")) -> tuple[pa.Table, bool]:
        """One read-only query; at most `row_cap` rows (and whether more existed)."""
        from py4j.protocol import Py4JJavaError
        from pyspark.errors import PySparkException

        text = sql.strip().rstrip(";").strip()
        if not text:
            raise SqlError("the query is empty: send one SELECT statement")
        conf = self.spark.conf
        previous = {name: conf.get(name) for name in _QUERY_SETTINGS}
        for name, value in _QUERY_SETTINGS.items():
            conf.set(name, value)
        try:
            try:
                self.spark._jsparkSession.sessionState().sqlParser().parseQuery(text)
            except (PySparkException, Py4JJavaError) as exc:  # pyspark converts ParseException
                first = next((line for line in str(exc).splitlines() if line.strip()), "")
                raise SqlError(f"only one SELECT query is allowed (the views are read-only): {first}") from None
            try:
                frame = self.spark.sql(f"SELECT * FROM (\n{text}\n) AS q LIMIT {row_cap + 1}")
                self._check_plan(frame._jdf.queryExecution().analyzed())
                table: Any = frame.toArrow()
            except (PySparkException, Py4JJavaError) as exc:
                raise SqlError(str(exc).splitlines()[0]) from None
        finally:
            for name, earlier in previous.items():
                if earlier is None:
                    conf.unset(name)
                else:
                    conf.set(name, earlier)
        truncated = table.num_rows > row_cap
        return (table.slice(0, row_cap) if truncated else table), truncated

    def _check_plan(self, plan: Any) -> None:
        """SqlError when an analyzed plan holds a node of `REFUSED_NODES`: every operator,
        expression and subquery is searched, except inside our own views (`View`)."""
        jvm = self.spark._jvm
        assert jvm is not None, "a classic (JVM) Spark session"
        query_plan = jvm.java.lang.Class.forName("org.apache.spark.sql.catalyst.plans.QueryPlan")
        plan_expression = jvm.java.lang.Class.forName("org.apache.spark.sql.catalyst.expressions.PlanExpression")
        stack = [plan]
        while stack:
            node = stack.pop()
            name = node.getClass().getSimpleName()
            if name in REFUSED_NODES:
                raise SqlError(f"{REFUSED_NODES[name]} is not allowed in served queries")
            if name == "View":
                continue
            nested = [node.children()]
            if query_plan.isInstance(node):
                nested.append(node.expressions())
            for seq in nested:
                items = seq.iterator()
                while items.hasNext():
                    stack.append(items.next())
            if plan_expression.isInstance(node):  # a subquery: its plan is not a child
                stack.append(node.plan())
