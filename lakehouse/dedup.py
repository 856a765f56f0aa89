"""Deduplication within a horizon: which valid records of a Kafka partition are events, and
which are later copies of one. One rule, one implementation, in every layer: batch
validation (inside Spark), the speed layer, `lambdalake verify`.

The rule, per partition, over its valid records in offset order:
- the partition's *clock* is the latest Kafka timestamp among the events taken so far
  (`NO_CLOCK` before the first); a record's clock is the later of the partition's clock and
  its own Kafka timestamp (a record without one has the partition's clock);
- a record is a *duplicate* when an event taken earlier with the same identity
  (`RecordSchema.dedup_key`) has a clock at least the record's clock minus the horizon
  (`RecordSchema.dedup_horizon_ms`; None: forever). Otherwise it is *taken*: an event whose
  clock is the record's clock, which becomes the partition's clock.

So a copy that arrives more than the horizon after the copy taken is a new event (as Spark's
`dropDuplicatesWithinWatermark` judges, but with a clock that depends on the topic's content
alone, never on how records were grouped into batches, so every layer agrees exactly). The
clock never goes back, so an identity whose clock lies more than the horizon behind it is
never needed again: the memory deduplication needs is the events of one horizon, not the
history. Invalid records and duplicates do not move the clock.

Only partitions matter, not topics: a record's identity includes its Kafka key entity, so
all copies of an event land in one partition.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

__all__ = ["CLOCK", "NO_CLOCK", "Dedup", "forgettable_below", "record_clock"]

NO_CLOCK = -1
CLOCK = "arrival_clock"  # the column of silver (and scored events) holding an event's clock


def record_clock(partition_clock: int, kafka_ms: int | None) -> int:
    """A record's clock: the later of the partition's clock and its Kafka timestamp."""
    if kafka_ms is None or kafka_ms < 0:
        return partition_clock
    return max(partition_clock, kafka_ms)


def forgettable_below(partition_clock: int, horizon_ms: int | None) -> int | None:
    """Taken events with a clock below this can no longer have duplicates (None: keep all)."""
    return None if horizon_ms is None else partition_clock - horizon_ms


class Dedup:
    """The rule over one partition, fed its valid records in offset order (`judge`).

    `clock` and `taken` (identity → clock of the event taken) are what was judged before
    (the online store's seen set, silver's rows within the horizon); `taken` may hold
    identities that have expired, and only needs those that have not."""

    def __init__(self, horizon_ms: int | None, *, clock: int = NO_CLOCK,
                 taken: Mapping[Any, int] | None = None) -> None:
        self.horizon_ms = horizon_ms
        self.clock = clock
        self.taken: dict[Any, int] = dict(taken or {})

    def is_duplicate(self, identity: Hashable, clock: int) -> bool:
        """Whether a record of this identity and clock copies an event taken."""
        earlier = self.taken.get(identity)
        if earlier is None:
            return False
        return self.horizon_ms is None or earlier >= clock - self.horizon_ms

    def judge(self, identity: Hashable, kafka_ms: int | None) -> int | None:
        """The record's clock when it is taken (an event); None for a duplicate."""
        clock = record_clock(self.clock, kafka_ms)
        if self.is_duplicate(identity, clock):
            return None
        self.taken[identity] = self.clock = clock
        return clock

    def forget_expired(self) -> None:
        """Drop the identities that can no longer have duplicates."""
        below = forgettable_below(self.clock, self.horizon_ms)
        if below is not None:
            self.taken = {i: c for i, c in self.taken.items() if c >= below}
