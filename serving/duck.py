"""The embedded SQL engine: DuckDB over the Delta tables, read through delta-rs and Arrow.

`DuckEngine.refresh()` takes a consistent snapshot of the lakehouse into one in-memory
DuckDB database, in one transaction, so a reader sees either the old or the new snapshot:

- `gold.<view>` and `batch.boundary`: the latest published batch run (of this spec), copied
  in, sorted by entity so that point lookups skip most of the table;
- `speed.increments`: the speed layer's scored events (of one consumer group) above that
  boundary. Only Delta files added since the last refresh are read; a new batch run deletes
  the increments its boundary now includes;
- `merged.*`: the views of `serving/views.py`, the same SQL Spark runs;
- the raw tables (bronze, silver, quarantine, batch runs, scored events, training set) as
  Arrow datasets at the snapshot's Delta versions, read only when a query touches them;
- `serving.snapshot`: which run, boundary and coverage the answers reflect.

User SQL is checked and then run under a locked configuration: one SELECT statement; no
file, network or extension access (`enable_external_access=false`); a row cap and a timeout.
DuckDB needs no extension for any of this: nothing is downloaded.

The check reads the query's parsed form (DuckDB's `json_serialize_sql`), not its text: a
table function must be one of `TABLE_FUNCTIONS` (values only: no file, catalog, settings or
SQL-running function answers), a scalar function must not reveal settings, variables or
secrets (`REFUSED_FUNCTIONS`), and a relation must be ours or `information_schema`'s (no
system catalog view such as `duckdb_databases` or `pg_settings`, no file name). DuckDB lets
even a locked connection read its temp directory, so each engine has a private one outside
the working directory (removed on close) that no query can learn the name of.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from lakehouse.config import setting_default
from lakehouse.errors import SqlError, SqlTimeout
from lakehouse.features import OFFSET, PARTITION
from lakehouse.scored import coverage as scored_coverage
from lakehouse.spec import FeatureView, PlatformSpec
from lakehouse.tables import BATCH_RUN_ID, BUCKET, EVENT_TIME_MS, Lakehouse, published_runs
from lakehouse.types import arrow_type, state_arrow_type
from serving.point import PointIndex, exact_int
from serving.views import (
    DUCKDB,
    SCHEMAS,
    merged_views,
    raw_tables,
    view_name,
)

log = logging.getLogger("lambdalake.serving")

# Table functions a query may call: they make or reshape values and read nothing else.
TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest", "json_each", "json_tree"})
# Scalar functions that reveal the engine's settings, environment, variables or secrets.
REFUSED_FUNCTIONS = frozenset({"current_setting", "getenv", "getvariable", "which_secret"})
# Name prefixes of DuckDB's catalog, settings and file functions and of system catalog views
# (duckdb_settings, pragma_database_list, read_text, pg_settings, ...), refused as any kind
# of call or relation, including those of a future DuckDB.
REFUSED_PREFIXES = ("duckdb_", "pragma_", "read_", "parquet_", "sniff_", "pg_", "sqlite_")
_FILE_NAME_CHARACTERS = frozenset("/\\.:*?~")




@dataclass(frozen=True)
class Snapshot:
    """What the merged views include: a batch run, and speed increments above its boundary."""

    run_id: str | None
    boundary: dict[int, int]
    scored_version: int | None
    coverage: dict[int, int]  # partition → highest offset whose events the views include
    increments: int
    refreshed_at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {"batch_run_id": self.run_id, "boundary": {str(p): o for p, o in sorted(self.boundary.items())},
                "coverage": {str(p): o for p, o in sorted(self.coverage.items())},
                "scored_events_version": self.scored_version, "speed_increments": self.increments}


@dataclass(frozen=True)
class QueryResult:
    table: pa.Table
    truncated: bool
    elapsed_ms: float


@dataclass(frozen=True)
class EntityStates:
    states: dict[str, dict[str, Any]]  # view → monoid states over the event's window
    unknown: list[str]  # entity fields no view holds anything for
    snapshot: dict[str, Any]  # batch_run_id, boundary, coverage of what was read


def _arrow_type(spec: PlatformSpec, name: str) -> pa.DataType:
    return arrow_type(next(f for f in spec.events.fields if f.name == name))


def gold_schema(spec: PlatformSpec, view: FeatureView) -> pa.Schema:
    """The gold table's columns (what an empty one looks like before the first run)."""
    return pa.schema([pa.field(view.entity, _arrow_type(spec, view.entity)),
                      pa.field(BUCKET, pa.int64()),
                      *[pa.field(n, state_arrow_type(a)) for n, a in view.aggregations.items()],
                      pa.field(BATCH_RUN_ID, pa.string())])


def increments_schema(spec: PlatformSpec) -> pa.Schema:
    return pa.schema([*[pa.field(f.name, _arrow_type(spec, f.name)) for f in spec.events.fields],
                      pa.field(EVENT_TIME_MS, pa.int64()),
                      pa.field(PARTITION, pa.int32()), pa.field(OFFSET, pa.int64())])


class DuckEngine:
    """Merged views and read-only SQL over one lakehouse, for one speed consumer group."""

    def __init__(self, spec: PlatformSpec, lakehouse: Lakehouse, *, group: str, topic: str | None = None,
                 partitions: int = 1, threads: int = 2,
                 memory_limit: str = setting_default("duckdb_memory_limit")) -> None:
        import duckdb

        self.spec = spec
        self.lakehouse = lakehouse
        self.group = group
        self.topic = topic or spec.events.topic
        self.partitions = partitions
        # DuckDB may always read its temp directory (default `.tmp` in the working directory)
        temp_directory = tempfile.mkdtemp(prefix="lambdalake-duckdb-")
        self._remove_temp_directory = weakref.finalize(self, shutil.rmtree, temp_directory, True)
        self._db = duckdb.connect(":memory:", config={
            "threads": threads, "memory_limit": memory_limit, "temp_directory": temp_directory,
            "autoinstall_known_extensions": False, "autoload_known_extensions": False})
        self._lock = threading.Lock()  # one refresh at a time
        self._local = threading.local()
        self._raw: dict[str, Any] = {}  # registered name → Arrow dataset
        self._raw_views: set[str] = set()
        self._generation = 0
        self._files: set[str] = set()  # scored_events files already read
        self._pending_files: set[str] = set()
        self._run: Any = None
        self._scored_version: int | None = None
        self.snapshot = Snapshot(None, {}, None, {}, 0, refreshed_at=0.0)
        self.point = PointIndex.empty(spec)
        self._create()
        self._db.execute("SET enable_external_access = false")
        self._db.execute("SET lock_configuration = true")

    # ------------------------------------------------------------------ set-up
    def _create(self) -> None:
        db = self._db
        for schema in SCHEMAS:
            db.execute(f"CREATE SCHEMA {schema}")
        for view in self.spec.views:
            self._replace_table(db, f"gold.{view.name}", gold_schema(self.spec, view).empty_table())
        db.execute(f'CREATE TABLE batch.boundary ("{PARTITION}" INTEGER, "{OFFSET}" BIGINT)')
        self._replace_table(db, "speed.increments", increments_schema(self.spec).empty_table())
        db.execute("CREATE TABLE serving.snapshot (batch_run_id VARCHAR, boundary VARCHAR, "
                   "coverage VARCHAR, scored_events_version BIGINT, speed_increments BIGINT, "
                   "refreshed_at TIMESTAMPTZ)")
        for name, sql in merged_views(self.spec, DUCKDB).items():
            db.execute(f"CREATE VIEW {name} AS {sql}")

    @staticmethod
    def _replace_table(db: Any, name: str, data: pa.Table, order_by: str | None = None) -> None:
        db.register("_load", data)
        try:
            order = f' ORDER BY "{order_by}"' if order_by else ""
            db.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM _load{order}")
        finally:
            db.unregister("_load")

    # ------------------------------------------------------------------ refresh
    def refresh(self) -> Snapshot:
        """Bring the snapshot up to the lakehouse's latest published run and scored events."""
        from deltalake import DeltaTable

        with self._lock:
            runs = [r for r in published_runs(self.lakehouse)
                    if r.spec_fingerprint == self.spec.fingerprint()]
            run = runs[0] if runs else None
            scored = (DeltaTable(self.lakehouse.scored_events)
                      if DeltaTable.is_deltatable(self.lakehouse.scored_events) else None)
            version = scored.version() if scored is not None else None
            new_run = run is not None and (self._run is None or run.run_id != self._run.run_id)
            if not new_run and version == self._scored_version and self._raw:
                return self.snapshot
            boundary = run.boundary if run is not None else {}
            # files added since the last refresh; everything again after a rewrite (OPTIMIZE)
            reload_all = new_run and self._run is not None and any(
                boundary.get(p, -1) < o for p, o in self._run.boundary.items())
            fresh: pa.Table | None = None
            if scored is not None and version != self._scored_version:
                if not self._appends_only(scored):
                    reload_all = True
                fresh = self._read_scored(scored, boundary, everything=reload_all)
            gold: dict[str, pa.Table] = {}
            db = self._db
            db.execute("BEGIN TRANSACTION")
            try:
                if new_run and run is not None:
                    for view in self.spec.views:
                        table = DeltaTable(self.lakehouse.gold(view.name),
                                           version=run.view_versions[view.name]).to_pyarrow_table()
                        self._replace_table(db, f"gold.{view.name}", table, order_by=view.entity)
                        gold[view.name] = table
                    db.execute("DELETE FROM batch.boundary")
                    if boundary:
                        db.executemany("INSERT INTO batch.boundary VALUES (?, ?)", sorted(boundary.items()))
                    db.execute(f'DELETE FROM speed.increments AS i USING batch.boundary AS b '
                               f'WHERE i."{PARTITION}" = b."{PARTITION}" AND i."{OFFSET}" <= b."{OFFSET}"')
                if reload_all:
                    db.execute("DELETE FROM speed.increments")
                if fresh is not None and fresh.num_rows:
                    db.register("_fresh", fresh)
                    db.execute("INSERT INTO speed.increments SELECT * FROM _fresh")
                    db.unregister("_fresh")
                counted = db.execute("SELECT count(*) FROM speed.increments").fetchone()
                increments = counted[0] if counted is not None else 0
                coverage = dict(boundary) if scored is None else scored_coverage(
                    scored, boundary, group=self.group, topic=self.topic, partitions=self.partitions)
                snapshot = Snapshot(run.run_id if run else None, dict(boundary), version, coverage,
                                    int(increments))
                db.execute("DELETE FROM serving.snapshot")
                db.execute("INSERT INTO serving.snapshot VALUES (?, ?, ?, ?, ?, now())",
                           [snapshot.run_id, json.dumps(snapshot.to_json()["boundary"]),
                            json.dumps(snapshot.to_json()["coverage"]), version, snapshot.increments])
                self._register_raw(db)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            point = self.point.with_run(run.run_id, boundary, gold) if new_run and run is not None else self.point
            point = point.with_events(fresh if fresh is not None else increments_schema(self.spec).empty_table(),
                                      coverage, replace=reload_all)
            if reload_all:
                self._files = set()
            self._files |= self._pending_files
            self._run, self._scored_version, self.snapshot, self.point = run, version, snapshot, point
            return snapshot

    def _appends_only(self, scored: Any) -> bool:
        """Whether every commit since the last refresh only appended files."""
        if self._scored_version is None:
            return not self._files
        history = scored.history(limit=max(1, scored.version() - self._scored_version))
        return all(h.get("operation") in ("WRITE", "CREATE TABLE") and
                   (h.get("operationParameters") or {}).get("mode", "Append") in ("Append", "ErrorIfExists")
                   for h in history if h.get("version", self._scored_version + 1) > self._scored_version)

    def _read_scored(self, scored: Any, boundary: Mapping[int, int], *, everything: bool) -> pa.Table:
        """This group's scored events above the boundary, from files not read yet."""
        import pyarrow.dataset as ds

        dataset = scored.to_pyarrow_dataset()
        fragments = [f for f in dataset.get_fragments() if everything or f.path not in self._files]
        self._pending_files = {f.path for f in fragments}
        schema = increments_schema(self.spec)
        if not fragments:
            return schema.empty_table()
        columns = [*self.spec.events.field_names, PARTITION, OFFSET]
        table = ds.FileSystemDataset(fragments, dataset.schema, dataset.format, dataset.filesystem).to_table(
            columns=columns, filter=pc.field("consumer_group") == self.group)
        if boundary:
            lowest = pa.array([boundary.get(p, -1) for p in table.column(PARTITION).to_pylist()], pa.int64())
            table = table.filter(pc.greater(table.column(OFFSET), lowest))
        time_field = self.spec.events.time_field
        ms = pc.divide(table.column(time_field).cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()), 1000)
        table = table.append_column(EVENT_TIME_MS, ms)
        return table.select(schema.names).cast(schema)

    def _register_raw(self, db: Any) -> None:
        from deltalake import DeltaTable

        raw: dict[str, Any] = {}
        for name, path in raw_tables(self.spec, self.lakehouse).items():
            if DeltaTable.is_deltatable(path):
                raw[name] = DeltaTable(path).to_pyarrow_dataset()
        for name, dataset in raw.items():
            registered = "raw__" + name.replace(".", "__")
            db.register(registered, dataset)
            if name not in self._raw_views:
                db.execute(f"CREATE VIEW {name} AS SELECT * FROM {registered}")
                self._raw_views.add(name)
        self._raw = raw
        self._generation += 1

    # ------------------------------------------------------------------ reading
    def _cursor(self) -> Any:
        """This thread's connection to the database, with the current raw datasets."""
        local = self._local
        cursor = getattr(local, "cursor", None)
        if cursor is None:
            cursor = local.cursor = self._db.cursor()
            local.generation = -1
        if local.generation != self._generation:
            for name, dataset in self._raw.items():
                cursor.register("raw__" + name.replace(".", "__"), dataset)
            local.generation = self._generation
        return cursor

    def query(self, sql: str, *, row_cap: int = setting_default("sql_row_cap"),
              timeout_s: float = setting_default("sql_timeout_s")) -> QueryResult:
        """Run one read-only SELECT; at most `row_cap` rows, interrupted after `timeout_s`."""
        import duckdb

        cursor = self._cursor()
        text = check_select(cursor, sql)
        timer = threading.Timer(timeout_s, cursor.interrupt)
        started = time.perf_counter()
        timer.start()
        try:
            table = cursor.sql(f"SELECT * FROM (\n{text}\n) AS q LIMIT {row_cap + 1}").to_arrow_table()
        except duckdb.InterruptException:
            raise SqlTimeout(f"the query ran longer than {timeout_s:g}s and was stopped") from None
        except duckdb.Error as exc:
            raise SqlError(f"{type(exc).__name__}: {exc}") from None
        finally:
            timer.cancel()
        elapsed = (time.perf_counter() - started) * 1000
        truncated = table.num_rows > row_cap
        return QueryResult(table.slice(0, row_cap) if truncated else table, truncated, elapsed)

    def entity_states(self, event: Mapping[str, Any]) -> EntityStates:
        """The states every view holds for an event's entities over the event's windows, as
        the speed layer computes them (see `serving/point.py`), the entity fields nothing is
        known about (their features are the monoids' identities), and the snapshot read."""
        point = self.point  # one immutable snapshot for the whole lookup
        states, unknown = point.states(event)
        return EntityStates(states, unknown, point.snapshot())

    def entity_features(self, entity_field: str, entity: Any) -> dict[str, dict[str, Any]]:
        """merged.<view> rows of one entity, per view that aggregates over `entity_field`
        ({} for a view that holds nothing for it)."""
        cursor = self._cursor()
        out: dict[str, dict[str, Any]] = {}
        cursor.execute("BEGIN TRANSACTION")
        try:
            for view in self.spec.views:
                if view.entity != entity_field:
                    continue
                result = cursor.execute(f'SELECT * FROM {view_name(view)} WHERE "{view.entity}" = ?', [entity])
                names = [d[0] for d in result.description]
                row = result.fetchone()
                out[view.name] = {} if row is None else {
                    n: exact_int(v) if n in view.aggregations else v
                    for n, v in zip(names, row, strict=True) if n != view.entity}
        finally:
            cursor.execute("COMMIT")
        return out

    def close(self) -> None:
        """Close the database and remove its temp directory."""
        self._db.close()
        self._remove_temp_directory()


def check_select(cursor: Any, sql: str) -> str:
    """The query text if it is exactly one SELECT statement calling only allowed functions
    over allowed relations (see the module docstring); SqlError saying why not."""
    import duckdb

    text = sql.strip().rstrip(";").strip()
    if not text:
        raise SqlError("the query is empty: send one SELECT statement")
    try:
        statements = cursor.extract_statements(text)
    except duckdb.Error as exc:
        raise SqlError(f"the query does not parse: {exc}") from None
    if len(statements) != 1:
        raise SqlError(f"send exactly one statement, got {len(statements)}")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise SqlError(f"only SELECT queries are allowed, got {kind.name}: the views are read-only")
    check_calls(cursor, text)
    return text


def check_calls(cursor: Any, text: str) -> None:
    """SqlError naming the first function or relation of one SELECT that is not allowed."""
    import duckdb

    try:
        serialized = cursor.execute("SELECT json_serialize_sql(?)", [text]).fetchall()[0][0]
        tree = json.loads(serialized)
    except (duckdb.Error, RecursionError, ValueError) as exc:
        raise SqlError(f"the query cannot be checked: {type(exc).__name__}") from None
    if tree.get("error"):
        raise SqlError(f"the query cannot be checked: {tree.get('error_message', 'unknown error')}")
    # iterative: a query's tree can be deeper than Python's recursion limit
    stack: list[Any] = [tree["statements"]]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        kind = node.get("type")
        if kind == "TABLE_FUNCTION":
            name = str((node.get("function") or {}).get("function_name", "")).lower()
            if name not in TABLE_FUNCTIONS:
                raise SqlError(f"the table function {name}() is not allowed; table functions allowed: "
                               f"{', '.join(sorted(TABLE_FUNCTIONS))}")
        elif kind == "BASE_TABLE":
            _check_relation(str(node.get("schema_name", "")).lower(), str(node.get("table_name", "")))
        elif node.get("class") == "FUNCTION":
            name = str(node.get("function_name", "")).lower()
            if name in REFUSED_FUNCTIONS or name.startswith(REFUSED_PREFIXES):
                raise SqlError(f"the function {name}() is not allowed: it reveals the server's "
                               "settings, files or secrets")
        stack.extend(node.values())


def _check_relation(schema: str, name: str) -> None:
    if _FILE_NAME_CHARACTERS & set(name):
        raise SqlError(f"reading the file {name!r} is not allowed: query the lakehouse's relations")
    if schema == "pg_catalog" or name.lower().startswith(REFUSED_PREFIXES):
        raise SqlError(f"the system relation {name} is not allowed; information_schema.tables and "
                       "information_schema.columns describe the relations")
