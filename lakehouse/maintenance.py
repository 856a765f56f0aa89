"""Delta table upkeep, with delta-rs (no Spark needed): compact small files, remove files no
version within the retention still needs, and write a log checkpoint.

The speed layer appends one small file per micro-batch and Spark's streaming ingest one per
trigger, so tables collect many small files; OPTIMIZE (bin-packing compaction) rewrites them
into few large ones in a commit that changes no row. Readers are unaffected: the serving
layer's refresh sees a non-append commit and reloads, the speed layer's app transactions
survive compaction. VACUUM deletes only files unreferenced for longer than the retention,
which bounds how far back time travel (`VERSION AS OF`) reaches: keep it longer than any
reader's snapshot (the published batch run's gold versions are rewritten per run anyway).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lakehouse.spec import PlatformSpec
from lakehouse.tables import Lakehouse


@dataclass(frozen=True)
class TableUpkeep:
    table: str
    version_before: int
    version_after: int
    files_removed_by_compaction: int
    files_added_by_compaction: int
    files_vacuumed: int


def lakehouse_tables(lakehouse: Lakehouse, spec: PlatformSpec) -> dict[str, str]:
    """Every Delta table of the lakehouse: name → path."""
    tables = {f"bronze/{t}": lakehouse.bronze(t) for t in spec.topics[:2]}
    for schema in (spec.events, spec.labels):
        tables[f"silver/{schema.name}"] = lakehouse.silver(schema.name)
        tables[f"quarantine/{schema.name}"] = lakehouse.quarantine(schema.name)
    for view in spec.views:
        tables[f"gold/{view.name}"] = lakehouse.gold(view.name)
    tables[f"training/{spec.name}"] = lakehouse.training_set(spec.name)
    tables["batch/batch_runs"] = lakehouse.batch_runs
    tables["speed/scored_events"] = lakehouse.scored_events
    return tables


def maintain(lakehouse: Lakehouse, spec: PlatformSpec, *, retention_hours: int,
             echo: Callable[[str], None] = lambda line: None) -> list[TableUpkeep]:
    """OPTIMIZE (compact), VACUUM (within the retention) and checkpoint every table."""
    from deltalake import DeltaTable

    done = []
    for name, path in lakehouse_tables(lakehouse, spec).items():
        if not DeltaTable.is_deltatable(path):
            continue
        table = DeltaTable(path)
        before = table.version()
        compacted = table.optimize.compact()
        table = DeltaTable(path)
        vacuumed = table.vacuum(retention_hours=retention_hours, dry_run=False,
                                enforce_retention_duration=False)
        table = DeltaTable(path)
        table.create_checkpoint()
        upkeep = TableUpkeep(name, before, table.version(), int(compacted.get("numFilesRemoved", 0)),
                             int(compacted.get("numFilesAdded", 0)), len(vacuumed))
        echo(f"{name}: v{before} → v{upkeep.version_after}, compacted "
             f"{upkeep.files_removed_by_compaction} files into {upkeep.files_added_by_compaction}, "
             f"vacuumed {upkeep.files_vacuumed}")
        done.append(upkeep)
    return done
