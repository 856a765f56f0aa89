"""The embedded SQL engine: DuckDB over the Delta tables, read through delta-rs and Arrow.

`DuckEngine.refresh()` takes a consistent snapshot of the lakehouse into one in-memory
DuckDB database, in one transaction, so a reader sees either the old or the new snapshot:

- `gold.<view>` and `batch.boundary`: the latest published batch run (of this spec, one that
  cut the online store), copied in, sorted by entity so that point lookups skip most of the
  table;
- `speed.<view>_states`: the online store's states above that run's cut (`serving/live.py`),
  native tables of the database. A refresh that adopts a new run loads them whole (the
  live states after its cut, few right after a handover); every other refresh asks the
  store for the (view, entity) pairs changed since the applied offsets it last read
  (`LiveMirror.catch_up`: one round trip) and deletes and inserts only the rows whose
  states changed, so it costs the changes since the last refresh, not the live states
  (which grow with the uptime since the run). The delete is one semi-join of the changed
  keys, a vectorised scan of the table's two key columns (measured at about 2 ms per
  100,000 rows): DuckDB 2.0 plans an upsert (`INSERT OR REPLACE`) as the same join, and an
  ART index lookup per key costs more. A refresh that fails part-way (the store down, say)
  leaves the next one to load them whole. No Delta file is listed;
- `merged.*`: the views of `serving/views.py`, the same SQL Spark runs;
- the raw tables (bronze, silver, quarantine, batch runs, scored events, training set) as
  Arrow datasets, each brought to its newest Delta version when a query names it
  (`RawTables`): a refresh never reads them, so its cost does not grow with their files;
- `serving.snapshot`: which run, boundary and coverage the answers reflect.

`/v1/predict` and `/v1/entities` do not wait for a refresh: they read the gold index and the
store at each request (`entity_states`, `entity_features`), as fresh as the speed layer's
last step; an entity's merged.<view> rows are computed from its states without a query, by
the Python form of the views' definition (`serving.views.Derived`). Without a store (a
lakehouse no speed layer writes) the views are gold alone.

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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from lakehouse.config import setting_default
from lakehouse.errors import ServiceError, SqlError, SqlTimeout
from lakehouse.features import OFFSET, PARTITION
from lakehouse.online.base import OnlineStore
from lakehouse.spec import FeatureView, PlatformSpec
from lakehouse.tables import BATCH_RUN_ID, BUCKET, Lakehouse, RunLog
from lakehouse.types import arrow_type, state_arrow_type
from serving.live import LiveMirror, LiveSource, adoptable, live_schema
from serving.point import PointIndex, exact_int
from serving.views import DUCKDB, SCHEMAS, live_name, merged_views, raw_tables, view_row

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
# how often a refresh looks for raw tables (bronze, silver, ...) that appeared since (a look at
# each missing one's directory), to give them a view; their data is read only by queries
RAW_REFRESH_S = 10.0




class RawTables:
    """The raw Delta tables (qualified name → path) as Arrow datasets, each brought up to date
    only when a query reads it: the table is kept open and only its new log entries are read
    (`update_incremental`), and its dataset is rebuilt only when its version moved. The
    refresh of the merged views never looks at them (scored_events takes a commit a second
    per speed member): reading a raw table costs what that table costs, not the platform's
    uptime. Thread-safe."""

    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = paths
        self._lock = threading.Lock()
        self._tables: dict[str, Any] = {}  # name → open DeltaTable
        self._datasets: dict[str, tuple[int, Any]] = {}  # name → (version, Arrow dataset)

    def new_tables(self, known: set[str]) -> set[str]:
        """The raw tables that exist now and are not in `known`."""
        from deltalake import DeltaTable

        return {name for name, path in self.paths.items()
                if name not in known and DeltaTable.is_deltatable(path)}

    def current(self, names: Iterable[str]) -> dict[str, tuple[int, Any]]:
        """(version, dataset) of each of `names` that exists, as of now; ServiceError when one
        cannot be read (its storage down, say)."""
        from deltalake import DeltaTable

        out = {}
        with self._lock:
            for name in sorted(names):
                path = self.paths.get(name)
                table = self._tables.get(name)
                try:
                    if table is not None:
                        table.update_incremental()
                    elif path is not None and DeltaTable.is_deltatable(path):
                        table = self._tables[name] = DeltaTable(path)
                    else:
                        continue
                    version = table.version()
                    known = self._datasets.get(name)
                    if known is None or known[0] != version:
                        known = self._datasets[name] = (version, table.to_pyarrow_dataset())
                except Exception as exc:  # noqa: BLE001 - delta-rs and the store raise their own kinds
                    raise ServiceError(f"the raw table {name} cannot be read now "
                                       f"({type(exc).__name__}: {exc})") from exc
                out[name] = known
        return out


def _registered(name: str) -> str:
    """The name a raw table's Arrow dataset is registered under (its view reads it)."""
    return "raw__" + name.replace(".", "__")


@dataclass(frozen=True)
class Snapshot:
    """What the merged views include: a batch run, and speed increments above its boundary."""

    run_id: str | None
    boundary: dict[int, int]
    coverage: dict[int, int]  # partition → highest offset whose events the views include
    increments: int  # live (view, entity, bucket) states
    refreshed_at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {"batch_run_id": self.run_id, "boundary": {str(p): o for p, o in sorted(self.boundary.items())},
                "coverage": {str(p): o for p, o in sorted(self.coverage.items())},
                "speed_increments": self.increments}


@dataclass(frozen=True)
class QueryResult:
    table: pa.Table
    truncated: bool
    elapsed_ms: float


@dataclass(frozen=True)
class EntityFeatures:
    views: dict[str, dict[str, Any]]  # view → its merged.<view> row for the entity ({}: nothing)
    snapshot: dict[str, Any]  # batch_run_id, boundary, coverage of what was read


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


def entity_types(spec: PlatformSpec) -> dict[str, pa.DataType]:
    return {view.entity: _arrow_type(spec, view.entity) for view in spec.views}


class DuckEngine:
    """Merged views and read-only SQL over one lakehouse and the online store of its speed
    group (None: gold only)."""

    def __init__(self, spec: PlatformSpec, lakehouse: Lakehouse, *, store: OnlineStore | None,
                 partitions: int = 1, threads: int = 2,
                 memory_limit: str = setting_default("duckdb_memory_limit")) -> None:
        import duckdb

        self.spec = spec
        self.lakehouse = lakehouse
        self._run_log = RunLog(lakehouse)  # each refresh reads only the new log entries
        self.store = store
        self.partitions = partitions
        self._entity_types = entity_types(spec)
        # DuckDB may always read its temp directory (default `.tmp` in the working directory)
        temp_directory = tempfile.mkdtemp(prefix="lambdalake-duckdb-")
        self._remove_temp_directory = weakref.finalize(self, shutil.rmtree, temp_directory, True)
        self._db = duckdb.connect(":memory:", config={
            "threads": threads, "memory_limit": memory_limit, "temp_directory": temp_directory,
            "autoinstall_known_extensions": False, "autoload_known_extensions": False})
        self._lock = threading.Lock()  # one refresh at a time
        self._local = threading.local()
        self._raw = RawTables(raw_tables(spec, lakehouse))  # read when a query names them
        self._raw_views: set[str] = set()
        self._run: Any = None
        self._mirror: LiveMirror | None = None  # the live states the speed tables hold
        self._refreshed = False
        self._raw_at = 0.0  # when the refresh last looked for raw tables without a view
        self.snapshot = Snapshot(None, {}, {}, 0, refreshed_at=0.0)
        self.point = PointIndex.empty(spec, LiveSource(store, partitions, {}))
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
            self._replace_table(db, live_name(view),
                                live_schema(self.spec, view, self._entity_types[view.entity]).empty_table())
        db.execute(f'CREATE TABLE batch.boundary ("{PARTITION}" INTEGER, "{OFFSET}" BIGINT)')
        db.execute("CREATE TABLE serving.snapshot (batch_run_id VARCHAR, boundary VARCHAR, "
                   "coverage VARCHAR, speed_increments BIGINT, refreshed_at TIMESTAMPTZ)")
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
    def refresh(self, *, full: bool = False) -> Snapshot:
        """Bring the snapshot up to the lakehouse's latest published run and the store; `full`:
        load the live states whole even when the run is the same (what every refresh cost
        before the store recorded its changes: benchmarks compare the two)."""
        from deltalake import DeltaTable

        with self._lock:
            runs = [r for r in self._run_log.runs() if adoptable(r, self.spec, self.store)]
            run = runs[0] if runs else None
            new_run = run is not None and (self._run is None or run.run_id != self._run.run_id)
            boundary = run.boundary if run is not None else {}
            point = self.point
            live = LiveSource(self.store, self.partitions, run.cut_epochs) if new_run and run is not None \
                else point.live
            appeared = self._raw_appeared() if not self._refreshed or \
                time.monotonic() - self._raw_at >= RAW_REFRESH_S else set()
            mirror = self._mirror if not new_run and not full else None
            self._mirror = None  # until the speed tables hold what the mirror does (set below)
            loaded: dict[str, pa.Table] | None = None  # whole speed tables to load (None: changes only)
            changes = None
            if self.store is None:
                coverage, increments = {}, 0
                loaded = {} if not self._refreshed else None
            elif mirror is None or (changes := mirror.catch_up()) is None:  # a new run, or the store went back
                mirror = LiveMirror(self.spec, live, self._entity_types)
                whole = mirror.load()
                loaded, coverage, increments = whole.tables, whole.coverage, whole.states
            else:
                coverage, increments = changes.coverage, changes.states
            moved = loaded is not None or (changes is not None and (
                not changes.empty or {**boundary, **coverage} != self.snapshot.coverage))
            if not new_run and not moved and self._refreshed and not appeared:
                self._mirror = mirror  # nothing changed: it still matches the tables
                return self.snapshot
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
                for view in self.spec.views:
                    if loaded is not None and view.name in loaded:
                        self._replace_table(db, live_name(view), loaded[view.name])
                    elif changes is not None:
                        self._change_rows(db, view, changes.gone[view.name], changes.rows[view.name])
                snapshot = Snapshot(run.run_id if run else None, dict(boundary), {**boundary, **coverage},
                                    increments)
                db.execute("DELETE FROM serving.snapshot")
                db.execute("INSERT INTO serving.snapshot VALUES (?, ?, ?, ?, now())",
                           [snapshot.run_id, json.dumps(snapshot.to_json()["boundary"]),
                            json.dumps(snapshot.to_json()["coverage"]), snapshot.increments])
                self._create_raw_views(db, appeared)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            if new_run and run is not None:
                point = point.with_run(run.run_id, boundary, run.cut_epochs, gold)
            self._run, self.snapshot, self.point, self._refreshed = run, snapshot, point, True
            self._mirror = mirror
            return snapshot

    def _change_rows(self, db: Any, view: FeatureView, gone: pa.Table, rows: pa.Table) -> None:
        """Delete the rows of `gone`'s (entity, bucket) keys from speed.<view>_states and insert
        `rows` (see the module docstring)."""
        entity, bucket = (f'"{name}"' for name in (view.entity, BUCKET))
        if gone.num_rows:
            db.register("_gone", gone)
            try:
                db.execute(f"DELETE FROM {live_name(view)} WHERE ({entity}, {bucket}) IN "
                           f"(SELECT {entity}, {bucket} FROM _gone)")
            finally:
                db.unregister("_gone")
        if rows.num_rows:
            db.register("_load", rows)
            try:
                db.execute(f"INSERT INTO {live_name(view)} SELECT * FROM _load")
            finally:
                db.unregister("_load")

    def _raw_appeared(self) -> set[str]:
        """The raw Delta tables that exist and have no view yet (a look at their directories)."""
        self._raw_at = time.monotonic()
        return self._raw.new_tables(self._raw_views)

    def _create_raw_views(self, db: Any, names: set[str]) -> None:
        """A view for each of these raw tables (so information_schema lists it); its data is
        read when a query names it (`_with_raw`)."""
        for name, (_, dataset) in self._raw.current(names - self._raw_views).items():
            registered = _registered(name)
            db.register(registered, dataset)
            db.execute(f"CREATE VIEW {name} AS SELECT * FROM {registered}")
            self._raw_views.add(name)

    # ------------------------------------------------------------------ reading
    def _cursor(self) -> Any:
        """This thread's connection to the database."""
        local = self._local
        cursor = getattr(local, "cursor", None)
        if cursor is None:
            cursor = local.cursor = self._db.cursor()
            local.raw_versions = {}
        return cursor

    def _with_raw(self, cursor: Any, relations: Iterable[str]) -> None:
        """The raw tables among `relations` (qualified names a query reads) registered on this
        thread's `cursor` at their current versions."""
        needed = self._raw.paths.keys() & set(relations)
        if not needed:
            return
        if needed - self._raw_views:
            with self._lock:  # a table that appeared since the refresh last looked: its view first
                self._create_raw_views(self._db, self._raw.new_tables(self._raw_views) & needed)
        versions = self._local.raw_versions
        for name, (version, dataset) in self._raw.current(needed).items():
            if versions.get(name) != version:
                cursor.register(_registered(name), dataset)
                versions[name] = version

    def query(self, sql: str, *, row_cap: int = setting_default("sql_row_cap"),
              timeout_s: float = setting_default("sql_timeout_s")) -> QueryResult:
        """Run one read-only SELECT; at most `row_cap` rows, interrupted after `timeout_s`."""
        import duckdb

        cursor = self._cursor()
        text, relations = check_select(cursor, sql)
        self._with_raw(cursor, relations)
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
        the speed layer computes them (see `serving/point.py`: gold ⊕ one store read), the
        entity fields nothing is known about (their features are the monoids' identities),
        and the run and coverage vector read. ServiceError when the store cannot be read."""
        point = self.point  # one immutable index for the whole lookup
        states, unknown, coverage = point.states(event)
        return EntityStates(states, unknown, point.snapshot(coverage))

    def entity_features(self, entity_field: str, entity: Any) -> EntityFeatures:
        """merged.<view> rows of one entity, per view that aggregates over `entity_field`
        ({} for a view that holds nothing for it), read now: gold ⊕ one store read, each row
        computed from that entity's states by the merged views' own definition
        (`serving.views.view_row`, the Python form of `view_sql`): no query."""
        point = self.point
        views = [view for view in self.spec.views if view.entity == entity_field]
        found, coverage = point.entity_states([(view.name, entity, 0) for view in views], whole=True)
        out: dict[str, dict[str, Any]] = {}
        for view in views:
            row = view_row(self.spec, view, entity, found[(view.name, entity)])
            out[view.name] = {} if row is None else {
                n: exact_int(v) if n in view.aggregations else v for n, v in row.items() if n != view.entity}
        return EntityFeatures(out, {**point.snapshot(coverage), "speed_increments": self.snapshot.increments})

    def close(self) -> None:
        """Close the database and remove its temp directory."""
        self._db.close()
        self._remove_temp_directory()


def check_select(cursor: Any, sql: str) -> tuple[str, set[str]]:
    """The query text if it is exactly one SELECT statement calling only allowed functions
    over allowed relations (see the module docstring), and the relations it reads (`check_calls`);
    SqlError saying why not."""
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
    return text, check_calls(cursor, text)


def check_calls(cursor: Any, text: str) -> set[str]:
    """SqlError naming the first function or relation of one SELECT that is not allowed;
    else the qualified names (`schema.table`, lower case) of the relations it reads."""
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
    relations: set[str] = set()
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
            schema, table = str(node.get("schema_name", "")).lower(), str(node.get("table_name", ""))
            _check_relation(schema, table)
            relations.add(f"{schema}.{table.lower()}")
        elif node.get("class") == "FUNCTION":
            name = str(node.get("function_name", "")).lower()
            if name in REFUSED_FUNCTIONS or name.startswith(REFUSED_PREFIXES):
                raise SqlError(f"the function {name}() is not allowed: it reveals the server's "
                               "settings, files or secrets")
        stack.extend(node.values())
    return relations


def _check_relation(schema: str, name: str) -> None:
    if _FILE_NAME_CHARACTERS & set(name):
        raise SqlError(f"reading the file {name!r} is not allowed: query the lakehouse's relations")
    if schema == "pg_catalog" or name.lower().startswith(REFUSED_PREFIXES):
        raise SqlError(f"the system relation {name} is not allowed; information_schema.tables and "
                       "information_schema.columns describe the relations")
