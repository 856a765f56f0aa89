"""The ground-truth file: one Parquet row per `events` message (`TRUTH_SCHEMA`), so that later
tests can judge a trained model against the Bayes-optimal score and prove that no message
was lost. `TruthWriter` streams rows as messages go by; `write_truth` writes a whole stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lakehouse.generator.simulation import EVENTS_TOPIC, Message

TRUTH_SCHEMA = pa.schema([
    pa.field("seq", pa.int64(), nullable=False),
    pa.field("sent_ms", pa.int64(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("event_id", pa.string()),
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("event_time_ms", pa.int64(), nullable=False),
    pa.field("label_time_ms", pa.int64()),
    pa.field("p_true", pa.float64(), nullable=False),
    pa.field("is_fraud", pa.bool_()),
    pa.field("compromised", pa.bool_(), nullable=False),
])
"""One row per message on the events topic; columns as the `Message` fields of that name."""

_TRUTH_COLUMNS = TRUTH_SCHEMA.names
_TRUTH_ROW_GROUP = 131_072


class TruthWriter:
    """Streams the truth rows of `events` messages into one Parquet file, a row group at a
    time (memory stays bounded for any number of events). Label messages are skipped: their
    content is in the row of the event they label. Use as a context manager."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(self.path, TRUTH_SCHEMA)
        self._columns: list[list[Any]] = [[] for _ in _TRUTH_COLUMNS]
        self.rows = 0

    def append(self, message: Message) -> None:
        if message.topic != EVENTS_TOPIC:
            return
        for column, value in zip(self._columns, (
            message.seq, message.sent_ms, message.kind, message.event_id, message.user_id,
            message.event_time_ms, message.label_time_ms, message.p_true, message.is_fraud,
            message.compromised,
        ), strict=True):
            column.append(value)
        self.rows += 1
        if len(self._columns[0]) >= _TRUTH_ROW_GROUP:
            self._flush()

    def tee(self, messages: Iterable[Message]) -> Iterator[Message]:
        """Pass messages through, recording each one's truth once the consumer has taken it
        and asks for the next (a message the consumer failed on is not recorded)."""
        for message in messages:
            yield message
            self.append(message)

    def _flush(self) -> None:
        if self._columns[0]:
            arrays = [pa.array(values, type=f.type) for values, f in zip(self._columns, TRUTH_SCHEMA, strict=True)]
            self._writer.write_table(pa.Table.from_arrays(arrays, schema=TRUTH_SCHEMA))
            self._columns = [[] for _ in _TRUTH_COLUMNS]

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def __enter__(self) -> TruthWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def write_truth(rows: Iterable[Message], path: str | Path) -> int:
    """Write the truth of the `events` messages among `rows` to Parquet; return the row count."""
    with TruthWriter(path) as writer:
        for message in rows:
            writer.append(message)
    return writer.rows
