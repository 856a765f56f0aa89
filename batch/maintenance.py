"""Delta table upkeep, with delta-rs (no Spark needed): compact small files, remove files no
version within the retention still needs, and write a log checkpoint.

The speed layer appends one small file per micro-batch and Spark's streaming ingest one per
trigger, so tables collect many small files; OPTIMIZE (bin-packing compaction) rewrites them
into few large ones in a commit that changes no row. Readers are unaffected: the serving
layer's refresh sees a non-append commit and reloads, the speed layer's app transactions
survive compaction. VACUUM deletes only files unreferenced for longer than the retention,
which bounds how far back time travel (`VERSION AS OF`) reaches: keep it longer than any
reader's snapshot (the published batch run's gold versions are rewritten per run anyway).

Two retentions are refused, before any table is touched or while one is, with a message that
says what to set:
- below Delta's safe minimum (168 h, `delta.deletedFileRetentionDuration`'s default) unless
  `LAMBDALAKE_DELTA_VACUUM_ALLOW_UNSAFE_RETENTION=true` says the operator accepts that a
  reader of an older snapshot may find its files gone (Delta's own guard, made explicit);
- any retention, allowed or not, that would delete a file a Spark stream has yet to read.
  The validate step reads bronze as a Delta stream from its checkpoint; when it falls behind
  (it failed for a day, or a week), OPTIMIZE compacts the files of the bronze versions it has
  not read, and VACUUM would then delete them: the stream could never resume. Rather than a
  rule of thumb on the time between batch runs, every streaming checkpoint under
  `_checkpoints/` is read: a Delta source's offset names its table (`reservoirId`) and the
  first version it may still read, and a VACUUM that would delete a file added at or after
  that version is refused for that table (the others are still maintained).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lakehouse.errors import BatchError, ConfigError
from lakehouse.spec import PlatformSpec
from lakehouse.tables import Lakehouse

if TYPE_CHECKING:
    from deltalake import DeltaTable

# Delta's default delta.deletedFileRetentionDuration (interval 1 week)
SAFE_RETENTION_HOURS = 168


@dataclass(frozen=True)
class TableUpkeep:
    table: str
    version_before: int
    version_after: int
    files_removed_by_compaction: int
    files_added_by_compaction: int
    files_vacuumed: int


def check_retention(retention_hours: float, *, allow_unsafe_retention: bool) -> None:
    """Refuse a retention below Delta's safe minimum unless explicitly allowed."""
    if retention_hours < SAFE_RETENTION_HOURS and not allow_unsafe_retention:
        raise ConfigError(
            f"LAMBDALAKE_DELTA_VACUUM_RETENTION_HOURS={retention_hours:g} is below Delta's safe "
            f"minimum of {SAFE_RETENTION_HOURS} h: a reader of an older snapshot (time travel, "
            f"a query or refresh in progress) may find its files deleted. Set it to "
            f"{SAFE_RETENTION_HOURS} or more, or set "
            f"LAMBDALAKE_DELTA_VACUUM_ALLOW_UNSAFE_RETENTION=true to accept that "
            f"(files a stream has yet to read are kept either way)."
        )


@dataclass(frozen=True)
class StreamPosition:
    """Where a Structured Streaming query reading a Delta table will resume.

    `version` is the first table version it may still read; `whole_snapshot` means it is
    still reading the initial snapshot of `version` (every file of that version), otherwise
    the files added by `version` and later commits."""

    checkpoint: str
    table_id: str
    version: int
    whole_snapshot: bool


def stream_positions(lakehouse: Lakehouse) -> list[StreamPosition]:
    """Every Delta-source position recorded under the lakehouse's `_checkpoints/`.

    A checkpoint's `offsets/<n>` holds the end offset of micro-batch n, `commits/<n>` marks
    it done; a restart re-runs the first batch not committed, starting at the end offset of
    the last committed one (with none committed, at the beginning of batch 0: the initial
    snapshot of the version in `offsets/0`). Sources that are not Delta tables (the ingest's
    Kafka offsets) carry no `reservoirId` and are skipped."""
    from pyarrow import fs as pafs

    root = lakehouse.checkpoint("").rstrip("/")
    try:
        filesystem, base = pafs.FileSystem.from_uri(root.replace("s3a://", "s3://", 1))
    except (ValueError, OSError) as exc:
        raise BatchError(
            f"cannot read the streaming checkpoints under {root} to check what VACUUM may "
            f"delete ({exc}); run maintenance where the Delta root is reachable") from None
    if filesystem.get_file_info(base).type != pafs.FileType.Directory:
        return []

    def batches(folder: str) -> list[int]:
        entries = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        return sorted(int(e.base_name) for e in entries
                      if e.type == pafs.FileType.File and e.base_name.isdigit())

    def read(path: str) -> str:
        with filesystem.open_input_stream(path) as handle:
            return bytes(handle.read()).decode()

    positions = []
    for entry in filesystem.get_file_info(pafs.FileSelector(base)):
        if entry.type != pafs.FileType.Directory:
            continue
        planned, committed = batches(f"{entry.path}/offsets"), batches(f"{entry.path}/commits")
        done = [n for n in committed if n in planned]
        if done:
            batch, resuming_in_batch_zero = done[-1], False
        elif planned:
            batch, resuming_in_batch_zero = planned[0], True
        else:
            continue
        for line in read(f"{entry.path}/offsets/{batch}").splitlines()[2:]:
            offset = _json_object(line)
            if offset is None or "reservoirId" not in offset:
                continue
            positions.append(StreamPosition(
                checkpoint=entry.base_name, table_id=str(offset["reservoirId"]),
                version=int(offset["reservoirVersion"]),
                whole_snapshot=resuming_in_batch_zero or bool(offset.get("isStartingVersion"))))
    return positions


def _json_object(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _paths(table: DeltaTable) -> set[str]:
    import pyarrow as pa

    return set(pa.chunked_array(table.get_add_actions(flatten=True).column("path")).to_pylist())


def files_still_needed(path: str, streams: Iterable[StreamPosition],
                       candidates: set[str]) -> dict[str, StreamPosition]:
    """Those of `candidates` (files VACUUM would delete) that a stream has yet to read."""
    from deltalake import DeltaTable

    needed: dict[str, StreamPosition] = {}
    latest = DeltaTable(path).version()
    for stream in sorted(streams, key=lambda s: s.version):
        remaining = candidates - needed.keys()
        if not remaining or stream.version > latest:
            continue
        already_read = set() if stream.whole_snapshot or stream.version == 0 else \
            _paths(DeltaTable(path, version=stream.version - 1))
        for version in range(stream.version, latest + 1):
            for file in (_paths(DeltaTable(path, version=version)) & remaining) - already_read:
                needed[file] = stream
    return needed


def maintain(lakehouse: Lakehouse, spec: PlatformSpec, *, retention_hours: int,
             allow_unsafe_retention: bool = False,
             echo: Callable[[str], None] = lambda line: None) -> list[TableUpkeep]:
    """OPTIMIZE (compact), VACUUM (within the retention) and checkpoint every table.

    Refuses (ConfigError) a retention below the safe minimum before touching anything; a
    table whose VACUUM would delete files a stream has yet to read is compacted and
    checkpointed but not vacuumed, and a BatchError naming it is raised at the end."""
    from deltalake import DeltaTable

    check_retention(retention_hours, allow_unsafe_retention=allow_unsafe_retention)
    streams = stream_positions(lakehouse)
    done, refused = [], []
    for name, path in lakehouse.delta_tables(spec).items():
        if not DeltaTable.is_deltatable(path):
            continue
        table = DeltaTable(path)
        before = table.version()
        compacted = table.optimize.compact()
        table = DeltaTable(path)
        readers = [s for s in streams if s.table_id == str(table.metadata().id)]
        doomed = set(table.vacuum(retention_hours=retention_hours, dry_run=True,
                                  enforce_retention_duration=False))
        needed = files_still_needed(path, readers, doomed) if readers and doomed else {}
        if needed:
            first = min(needed.values(), key=lambda s: s.version)
            refused.append(
                f"VACUUM of {name} refused: it would delete {len(needed)} files that the stream "
                f"of checkpoint {first.checkpoint!r} has yet to read (from {name} version "
                f"{first.version}; the table is at version {table.version()}). Let the stream "
                f"catch up first (`lambdalake batch validate`, or the lambdalake_batch DAG), "
                f"or raise LAMBDALAKE_DELTA_VACUUM_RETENTION_HOURS above the age of those files")
            vacuumed: list[str] = []
        else:
            vacuumed = table.vacuum(retention_hours=retention_hours, dry_run=False,
                                    enforce_retention_duration=False)
        table = DeltaTable(path)
        table.create_checkpoint()
        upkeep = TableUpkeep(name, before, table.version(), int(compacted.get("numFilesRemoved", 0)),
                             int(compacted.get("numFilesAdded", 0)), len(vacuumed))
        echo(f"{name}: v{before} → v{upkeep.version_after}, compacted "
             f"{upkeep.files_removed_by_compaction} files into {upkeep.files_added_by_compaction}, "
             f"vacuumed {upkeep.files_vacuumed}{' (VACUUM refused)' if needed else ''}")
        done.append(upkeep)
    if refused:
        raise BatchError("; ".join(refused))
    return done
