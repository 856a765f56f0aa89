"""The online store's contract: the real-time view as monoid-state increments per Kafka
partition and epoch, applied exactly once, read as of a coverage vector.

The speed layer applies each micro-batch of one partition as one atomic step (`apply`): the
increments of the events above the partition's applied offset, merged into the partition's
open epoch, together with the new applied offset. A step at or below the applied offset
changes nothing, so a micro-batch replayed after a crash, or one a fenced member (a zombie)
still sends, is harmless.

A batch run cuts every partition (`cut`): the applied offset becomes the cut, which the run
takes as its boundary, and a new epoch opens. `max` and `min` cannot be subtracted, so the
increments of one epoch are never folded into another: a reader of a run merges the run's
gold views with the epochs after the run's cut (`read`, `scan`), which hold exactly the
events above its boundary. Epochs that no published run's readers need any more are
dropped (`drop_epochs`).

Every read says what it reflects: per partition, the applied offset its states include
(the coverage vector), read in the same atomic step as the states.

A reader that keeps the live states (the SQL engines' `speed.<view>_states`) need not read
them all again: every step (and `restore`) also records, per partition, which blocks (a
view's buckets of one entity, one window wide: `block_of`) it changed and at which applied
offset, in the same atomic step, so `changes` gives exactly the blocks changed above the
offset a reader last read, with their states, and a refresh costs the changes since the last
one, not the uptime. A step, likewise, costs the blocks its events fall in, not the
entity's buckets since the batch run's cut.

A step carries two more things of its records above the applied offset, so that the store
is the speed layer's one sink of record: the scored rows, kept in the partition's outbox
until they are in Delta (`pending`, `flushed`: `speed/scored_events` follows the store, at
most about once a second), and the identities (`RecordSchema.dedup_key`) of the events it
took, with their clocks (`lakehouse.dedup`), so that a later copy of an event is recognised
by whichever member consumes it (`seen`). The partition's clock moves with them, and an
identity more than the schema's dedup horizon behind it is forgotten in the same step: the
seen set holds one horizon of events, whatever the uptime.
"""

from __future__ import annotations

import functools
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lakehouse.errors import ServiceError
from lakehouse.features import ViewStates
from lakehouse.spec import FeatureView, PlatformSpec, RecordSchema

__all__ = ["NOTHING", "BlockKey", "BlockStates", "Changes", "Cut", "Increments", "OnlineStore", "Seen", "StateKey",
           "Step", "StoreBehindError", "StoreRead", "block_of", "blocks_between", "by_block", "event_identity",
           "increments_of", "merge_into"]

StateKey = tuple[str, Any, int]  # (feature view, entity, bucket start)
# key → the view's monoid states, in the order of its aggregations
Increments = Mapping[StateKey, Sequence[Any]]
# (feature view, entity, block start): the buckets a store keeps together (`block_of`)
BlockKey = tuple[str, Any, int]
# block → bucket start → the view's monoid states: every bucket of one block
BlockStates = dict[BlockKey, dict[int, list[Any]]]

FIRST_EPOCH = 1
_V = TypeVar("_V")
NOTHING = -1  # the applied offset of a partition never applied


class StoreBehindError(ServiceError):
    """A step would leave a gap: the store holds less of a partition than the member that
    consumed it (a store restored from an older state, or wiped)."""


@dataclass(frozen=True)
class Cut:
    """A partition's epoch closed by a batch run: the epochs up to `epoch` hold exactly the
    events at or below `offset` (the run's boundary in this partition); later events go to
    `epoch + 1` and after."""

    partition: int
    epoch: int
    offset: int


@dataclass(frozen=True)
class Step:
    """What one step adds for the records above the applied offset: their monoid-state
    increments, their scored rows (offset → encoded row, for the outbox; or a callable
    giving them, called just before the step writes, after the store read what it changes:
    the caller may still be scoring them) and the identities of the events taken, with their
    clocks (epoch ms, `lakehouse.dedup`); and `homed`: the
    partition count under which every one of these events lies in its key entity's home
    partition (`lakehouse.streams.home_partition`), 0 where that is not known."""

    increments: Increments
    rows: Mapping[int, bytes] | Callable[[], Mapping[int, bytes]]
    seen: Mapping[str, int]
    homed: int = 0

    def encoded_rows(self) -> Mapping[int, bytes]:
        return self.rows() if callable(self.rows) else self.rows


# per partition: (its clock, identity → clock of the event taken) of the identities asked
Seen = dict[int, tuple[int, dict[str, int]]]


@dataclass(frozen=True)
class StoreRead:
    """States summed over the partitions and epochs read, per block (`block_of`), and what
    they reflect. Read-only: its bucket states may be shared with the backend's own."""

    blocks: BlockStates
    coverage: dict[int, int]  # partition → the applied offset the states include
    epochs: dict[int, int]  # partition → the epoch open when it was read
    # partitions a floored cut after the reader's run cut ends (`OnlineStore.read`)
    floored: set[int] = field(default_factory=set)
    # what the backend read that a step of the same partitions may start from
    # (`OnlineStore.apply_many`'s basis); None: nothing
    basis: object = field(default=None, compare=False)
    # the look-up of the identities the read was given (`OnlineStore.seen`), per partition
    seen: Seen = field(default_factory=dict)

    @functools.cached_property
    def states(self) -> dict[StateKey, list[Any]]:
        """The same states per (view, entity, bucket)."""
        return {(view, entity, bucket): values for (view, entity, _), buckets in self.blocks.items()
                for bucket, values in buckets.items()}


@dataclass(frozen=True)
class Changes:
    """What changed in one partition above an applied offset: every block a step changed at
    a later offset, with all its buckets' states summed over the epochs read ({} where those
    epochs hold none of it), read atomically with `applied`."""

    applied: int  # the applied offset the states include
    epoch: int  # the epoch open when it was read
    blocks: BlockStates


def event_identity(schema: RecordSchema, record: Mapping[str, Any]) -> str:
    """An event's identity in the seen set: its `RecordSchema.dedup_key` as compact JSON (the
    speed layer's steps and the batch run's floors write it the same way)."""
    return json.dumps(list(schema.dedup_key(record)), separators=(",", ":"))


def block_of(view: FeatureView, bucket: int) -> int:
    """The start of the block that holds a bucket: a store keeps one view's states of one
    entity in blocks of one window's width (`window_buckets` buckets), so an event's window
    lies in at most two blocks and a step rewrites the blocks its events fall in, whatever
    the entity's history since the batch run's cut. A view without a window has one block (0)."""
    if view.bucket_ms is None or view.window_buckets is None:
        return 0
    span = view.bucket_ms * view.window_buckets
    return bucket - bucket % span


def by_block(views: Mapping[str, FeatureView], states: Mapping[StateKey, _V]) -> dict[BlockKey, dict[int, _V]]:
    """States per (view, entity, bucket) grouped by the block (`block_of`) that holds them."""
    out: dict[BlockKey, dict[int, _V]] = {}
    for (view, entity, bucket), values in states.items():
        out.setdefault((view, entity, block_of(views[view], bucket)), {})[bucket] = values
    return out


def blocks_between(view: FeatureView, first: int, last: int) -> range:
    """The starts of the blocks that hold the buckets from `first` through `last`."""
    if view.bucket_ms is None or view.window_buckets is None:
        return range(0, 1)
    span = view.bucket_ms * view.window_buckets
    return range(block_of(view, first), block_of(view, last) + 1, span)


def merge_into(spec: PlatformSpec, into: dict[StateKey, list[Any]], key: StateKey,
               states: Sequence[Any]) -> None:
    """Fold one key's states into `into` with the view's monoids."""
    current = into.get(key)
    if current is None:
        into[key] = list(states)
        return
    aggregations = list(spec.view(key[0]).aggregations.values())
    for i, aggregation in enumerate(aggregations):
        current[i] = aggregation.plus(current[i], states[i])


def increments_of(spec: PlatformSpec, events: Iterable[Mapping[str, Any]]) -> dict[StateKey, list[Any]]:
    """The monoid-state increments of typed events, per (view, entity, bucket): what a step
    adds to the store (the fold of `lakehouse.features`, the one every layer uses)."""
    tables = [ViewStates(view) for view in spec.views]
    time_field = spec.events.time_field
    for event in events:
        for table in tables:
            table.add(event, time_field)
    return {(table.view.name, entity, bucket): values
            for table in tables for entity, bucket, values in table.held()}


class OnlineStore(ABC):
    """Increments of one consumer group's speed layer, for one platform spec."""

    def __init__(self, spec: PlatformSpec, group: str) -> None:
        self.spec = spec
        self.group = group
        self.topic = spec.events.topic

    @abstractmethod
    def ping(self) -> None:
        """ServiceError when the store cannot be reached."""

    @abstractmethod
    def applied(self, partitions: Iterable[int]) -> dict[int, int]:
        """Per partition, the highest offset applied (-1: none)."""

    @abstractmethod
    def apply(self, partition: int, from_offset: int, last_offset: int,
              step_above: Callable[[int], Step]) -> bool:
        """One atomic step for the records a member consumed from `from_offset` through
        `last_offset`: of those above the partition's applied offset (`step_above(applied)`),
        the increments merged into its open epoch, the rows added to its outbox and the
        identities to its seen set (the partition's clock moved to the latest of theirs, and
        identities beyond the dedup horizon forgotten), and `last_offset` recorded as applied. False (nothing
        changed) when `last_offset` is already applied; StoreBehindError when `from_offset`
        lies above the applied offset + 1 (the records in between would be lost: the store
        lost state)."""

    def apply_many(self, steps: Sequence[tuple[int, int, int, Callable[[int], Step]]], *,
                   basis: object = None) -> dict[int, bool]:
        """`apply` of several partitions' steps, (partition, from_offset, last_offset,
        step_above) each: per partition whether it changed anything. Each partition's step
        is atomic on its own; a backend may send them together (fewer round trips), and may
        start from what a read of the same partitions saw (`StoreRead.basis`) where nothing
        wrote them since, which it checks as part of the step."""
        return {p: self.apply(p, first, last, step_above) for p, first, last, step_above in steps}

    @abstractmethod
    def seen(self, identities: Mapping[int, Sequence[str]]) -> Seen:
        """Per partition, its clock and, of the given event identities, those a step (or a
        cut's floor) recorded and not yet forgot, with their clocks."""

    @abstractmethod
    def cut(self, partition: int, *, floor: int = NOTHING,
            remember: Callable[[int], Iterable[tuple[str, int]]] | None = None) -> Cut:
        """Close the partition's open epoch at its applied offset and open the next. Where
        the speed group never applied a step, the cut is at `floor` if that is higher (the
        offsets the batch run validated: it covers them, and the group resumes after them);
        the identities, with their clocks, of the events the floor passes over
        (`remember(previous applied)`, those at offsets above it through `floor`, within the
        dedup horizon) join the seen set in the same step, so a later copy of one is still
        recognised."""

    @abstractmethod
    def pending(self, partition: int) -> tuple[int, list[bytes]]:
        """(applied offset, the outbox's rows in offset order), read atomically: what
        `speed/scored_events` must hold for the partition through the applied offset."""

    @abstractmethod
    def flushed(self, partition: int, through: int) -> None:
        """Drop the outbox rows at or below `through` (they are in Delta)."""

    @abstractmethod
    def read(self, keys: Iterable[StateKey], partitions: Iterable[int],
             after: Mapping[int, int], *, whole: bool = False,
             identities: Mapping[int, Sequence[str]] | None = None) -> StoreRead:
        """The states of `keys` summed over `partitions` and their epochs after
        `after[p]` (0 where absent: every epoch), each partition read atomically. The states
        of every bucket of the blocks that hold the keys' buckets come back (`block_of`), not
        only the buckets asked; with `whole`, every bucket of the keys' (view, entity) pairs
        (their blocks looked up in the same atomic read).

        A partition the speed group never stepped, floored by a later run's cut, jumped over
        offsets that no epoch holds (that run's views do): for a reader of an older run it
        ends at that cut, with the coverage of the offset before the jump (`floored`), until
        the reader adopts the run that floored it. `scan` and `changes` read the same way.

        With `identities` (per partition, of partitions read), the read looks them up too, as
        `seen` does, atomically with that partition's states (`StoreRead.seen`): a micro-batch
        judges its duplicates and reads its states in one round trip."""

    @abstractmethod
    def scan(self, partition: int, after: int) -> tuple[int, Iterator[tuple[StateKey, list[Any]]]]:
        """(applied offset, every key's states) of one partition's epochs after `after`, as
        one atomic read."""

    @abstractmethod
    def changes(self, since: Mapping[int, int], after: Mapping[int, int]) -> dict[int, Changes]:
        """Per partition of `since`: the blocks (`block_of`) changed at offsets above
        `since[p]`, each with its states summed over the epochs after `after[p]` (0 where
        absent: every epoch), and the applied offset, each partition read atomically (one
        round trip in all). Exact for any `since[p]` at or above the cut of the newest
        dropped epoch: a reader of a run that read the partition at `since[p]` (a `scan`
        or an earlier `changes`) holds, with these, exactly what a new `scan` would return.
        Costs the changed blocks (each at most one window of buckets), not the live states."""

    @abstractmethod
    def drop_epochs(self, partition: int, through: int) -> int:
        """Delete the partition's epochs up to `through` (closed ones only), and the record
        of the pairs last changed at or below the last dropped epoch's cut (they live in
        no epoch after it); how many epochs."""

    @abstractmethod
    def restore(self, partition: int, *, epoch: int, applied: int, increments: Increments,
                seen: Mapping[str, int]) -> None:
        """Re-derive a partition the store lost (`lambdalake speed rebuild`): `increments`
        as its open epoch `epoch` (the one after the published run's cut), `applied` as its
        applied offset (every pair changed at it, for `changes`), `seen` as its identities
        (with their clocks; the partition's clock is the latest).
        ServiceError when the partition holds
        anything (wipe it first)."""

    @abstractmethod
    def wipe(self) -> None:
        """Delete everything of this group (`lambdalake speed rebuild` starts from here)."""
