"""The online store on Redis (any Redis-protocol server; Redis Cluster too).

Layout, per consumer group, topic and Kafka partition, all under one hash tag so that every
step touches one slot (`{<prefix>:<group>:<topic>:<partition>}`; `open_store` names the
lakehouse in the prefix):

    {…}:meta        hash: applied (the highest offset applied), epoch (the open one),
                    cut:<e> (the applied offset at which epoch e was closed), stepped (set
                    by the first step of the speed group), clock (the partition's clock,
                    `lakehouse.dedup`)
    {…}:e<epoch>    hash: one field per block (`block_of`: one view's buckets of one entity,
                    one window wide), "<view>\\x1f<entity as JSON>\\x1f<block start>" →
                    {bucket start: the view's monoid states as a list} in JSON (exact
                    integers, None for an empty max/min), so an event's window is at most
                    two fields and a step rewrites only the blocks its events fall in; and
                    one index field per (view, entity), "<view>\\x1f<entity as JSON>" →
                    its blocks' starts in this epoch, comma-separated (a whole-entity read)
    {…}:changed     sorted set: the epoch hashes' block fields,
                    scored by the applied offset of the last step (or restore) that changed
                    them; trimmed by `drop_epochs` to the fields an epoch after the dropped
                    cut may hold
    {…}:outbox      sorted set: scored rows not yet in Delta, scored by Kafka offset
    {…}:seen        sorted set: identities of the events taken (the dedup key as JSON),
                    scored by their clocks; those more than the dedup horizon behind the
                    partition's clock are removed by the step that moves it

`apply_many` (and `apply`, one partition) is optimistic, three round trips for all the
partitions of a micro-batch: it reads each meta hash (the applied offset, the open epoch and
a token that every write of the meta hash replaces), asks for the increments of the events
above the applied offset, reads the blocks they change, merges them with the spec's monoids
(in Python: sums of squares outgrow 64-bit integers, which Redis' HINCRBY and Lua's numbers
cannot hold), and sends one step script per partition (`_STEP`), which writes the states,
the changed blocks' new score in `{…}:changed` (ZADD overwrites: a field's score is the
last offset that changed it), the blocks new in the epoch in their indexes, the outbox rows,
the seen identities and the new applied offset only if the token is still the one read.
Any other apply, cut, restore or wipe of the partition in between replaced or removed the
token, so the script writes nothing and that partition's step starts over from what is
applied then. The speed layer's steps start from its micro-batch's read instead (`_READ`
returns the meta hash's token and clock with the open epoch's blocks: `StoreRead.basis`),
so they cost one round trip, the step script alone; the token makes that exactly as safe. `cut` and `restore` WATCH the
meta hash and write it in one MULTI/EXEC.

`read` and `scan` run one Lua script per partition, which returns the applied offset and
the states of the epochs asked for in one atomic step; the partitions of one read go out
in one pipeline (one round trip). The script is told the epoch keys to read (scripts name
their keys, as Redis Cluster needs): the epochs after the run's cut up to the open epoch
last seen, and says so when a cut has opened a newer one since, which is read again. A
read asks for blocks, or, to read (view, entity) pairs whole (`/v1/entities`), for their
indexes, which the script follows to their blocks in the same atomic step; and it looks
up event identities in the seen set (ZMSCORE), with the clock, in the same step (`seen` is
that look-up alone: one script per partition, never a transaction across slots).
`changes` is the same kind of script: the fields scored above the reader's offset in
`{…}:changed` (ZRANGEBYSCORE) and those fields of the epochs asked for, with the applied
offset, atomically, so its cost is the fields changed, not the partition's states.
`drop_epochs` deletes the epoch hashes and the changed fields scored at or below the last
dropped epoch's cut in one MULTI/EXEC (a later change scores above the cut: never lost).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import msgspec
import redis

from lakehouse.dedup import NO_CLOCK, forgettable_below
from lakehouse.errors import ServiceError
from lakehouse.online.base import (
    FIRST_EPOCH,
    NOTHING,
    BlockKey,
    BlockStates,
    Changes,
    Cut,
    Increments,
    OnlineStore,
    Seen,
    StateKey,
    Step,
    StoreBehindError,
    StoreRead,
    block_of,
    by_block,
    merge_into,
)
from lakehouse.spec import PlatformSpec
from lakehouse.streams import home_partition

__all__ = ["RedisOnlineStore"]

# The start of the read scripts (each sets FIRST_KEY, the index of the key of epoch after+1,
# before it): the applied offset, the open epoch and `after` (ARGV[1]); a reply {applied,
# epoch, stale = 1, 0} when the keys do not reach the open epoch (a cut opened one since);
# and a floored cut after `after` (a partition the speed group never stepped jumped over
# offsets that no epoch holds, which only the next published run's views hold): the
# reader's view of the partition ends at that cut (`through`, the last epoch key to read),
# with the offset before the jump.
_PROLOGUE = """
local function chunked(command, key, names, first, last)
  local values = {}  -- in chunks: Lua's unpack takes a few thousand values at most
  for s = first, last, 1000 do
    local chunk = redis.call(command, key, unpack(names, s, math.min(s + 999, last)))
    for j = 1, #chunk do
      values[#values + 1] = chunk[j]
    end
  end
  return values
end
local applied = redis.call('HGET', KEYS[1], 'applied') or '-1'
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '1')
local after = tonumber(ARGV[1])
if after + #KEYS - FIRST_KEY + 1 < epoch then
  return {applied, epoch, 1, 0}
end
local floored, through = 0, #KEYS
for e = after + 1, epoch - 1 do
  local jumped_from = redis.call('HGET', KEYS[1], 'floor:' .. e)
  if jumped_from then
    applied, floored, through = jumped_from, 1, e - after + FIRST_KEY - 1
    break
  end
end
"""

# KEYS: meta, seen, then the epoch hashes after+1, after+2, …; ARGV: after, homing, n, m,
# then n block fields to read, then m event identities to look up in the seen set, then
# index fields of (view, entity) pairs to read whole (n = -1: every field). homing: the
# partition count under which the reader left out key entities homed elsewhere ('0': none
# left out); unless the meta hash's homed is that count, the reply is {applied, epoch, 2, 0}
# (read again with every field). Returns {applied, open epoch, stale?, floored?, the meta
# hash's {token, clock, stepped} (what a step may start from: `_Basis`), the m identities'
# clocks in the seen set (nil: not there), per epoch key read: the n blocks' values, then
# field/value pairs of the blocks the indexes list}.
_READ = """
local FIRST_KEY = 3
""" + _PROLOGUE + """
if ARGV[2] ~= '0' and redis.call('HGET', KEYS[1], 'homed') ~= ARGV[2] then
  return {applied, epoch, 2, 0}
end
local n = tonumber(ARGV[3])
local m = tonumber(ARGV[4])
local ids = 5 + math.max(n, 0)
local out = {applied, epoch, 0, floored, redis.call('HMGET', KEYS[1], 'token', 'clock', 'stepped'),
             chunked('ZMSCORE', KEYS[2], ARGV, ids, ids + m - 1)}
for i = FIRST_KEY, through do
  if n < 0 then
    out[#out + 1] = redis.call('HGETALL', KEYS[i])
  else
    local values = chunked('HMGET', KEYS[i], ARGV, 5, 4 + n)
    for s = 5 + n + m, #ARGV do
      local index = redis.call('HGET', KEYS[i], ARGV[s])
      if index then
        for block in string.gmatch(index, '[^,]+') do
          local name = ARGV[s] .. '\\31' .. block
          values[#values + 1] = name
          values[#values + 1] = redis.call('HGET', KEYS[i], name)
        end
      end
    end
    out[#out + 1] = values
  end
end
return out
"""

# KEYS: meta, changed, then the epoch hashes after+1, after+2, …; ARGV: after, since.
# Returns {applied, open epoch, stale?, floored?, the fields changed above since, per epoch
# key read: their values}.
_CHANGES = """
local FIRST_KEY = 3
""" + _PROLOGUE + """
local fields = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[2], '+inf')
local out = {applied, epoch, 0, floored, fields}
for i = 3, through do
  out[#out + 1] = chunked('HMGET', KEYS[i], fields, 1, #fields)
end
return out
"""

# One step of one partition, if nothing changed it since the step read it (the meta hash's
# token, which every write of the meta hash replaces). KEYS: meta, the open epoch's hash,
# changed, outbox, seen. ARGV: the token read, the new token, the applied offset, the
# epoch, the clock, the lowest clock the seen set keeps ('' : all), the step's `homed`
# (the meta hash's homed stays that partition count while every step says the same, from
# the partition's first step on; else it is 0 for good), then four counted
# lists: field/value pairs of the epoch hash (blocks), score/row pairs of the outbox,
# score/identity pairs of the seen set, index field/block pairs of the blocks new in the
# epoch (appended to the index). 0 when the token differs (nothing written), else 1.
_STEP = """
local function chunked(command, key, list, first, last)
  for s = first, last, 1000 do
    redis.call(command, key, unpack(list, s, math.min(s + 999, last)))
  end
end
if (redis.call('HGET', KEYS[1], 'token') or '') ~= ARGV[1] then
  return 0
end
local homed = redis.call('HGET', KEYS[1], 'homed')
if not homed then
  homed = redis.call('HEXISTS', KEYS[1], 'stepped') == 1 and '0' or ARGV[7]
elseif homed ~= ARGV[7] then
  homed = '0'
end
local i = 9
local fields = tonumber(ARGV[8])
if fields > 0 then
  chunked('HSET', KEYS[2], ARGV, i, i + 2 * fields - 1)
  local scored = {}
  for j = i, i + 2 * fields - 1, 2 do
    scored[#scored + 1] = ARGV[3]
    scored[#scored + 1] = ARGV[j]
  end
  chunked('ZADD', KEYS[3], scored, 1, #scored)
end
i = i + 2 * fields
local rows = tonumber(ARGV[i])
if rows > 0 then
  chunked('ZADD', KEYS[4], ARGV, i + 1, i + 2 * rows)
end
i = i + 1 + 2 * rows
local seen = tonumber(ARGV[i])
if seen > 0 then
  chunked('ZADD', KEYS[5], ARGV, i + 1, i + 2 * seen)
  if ARGV[6] ~= '' then
    redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '(' .. ARGV[6])
  end
end
i = i + 1 + 2 * seen
for j = i + 1, i + 2 * tonumber(ARGV[i]), 2 do
  local index = redis.call('HGET', KEYS[2], ARGV[j])
  redis.call('HSET', KEYS[2], ARGV[j], index and (index .. ',' .. ARGV[j + 1]) or ARGV[j + 1])
end
redis.call('HSET', KEYS[1], 'applied', ARGV[3], 'epoch', ARGV[4], 'stepped', 1, 'clock', ARGV[5],
           'token', ARGV[2], 'homed', homed)
return 1
"""

_ATTEMPTS = 100
# an epoch hash's field: bucket start → states (exact integers of any size, None)
_BUCKETS = msgspec.json.Decoder(dict[int, list[Any]])
_ENCODE = msgspec.json.Encoder().encode  # the same compact JSON: bucket keys as strings
_ENTITY = msgspec.json.Decoder().decode  # an entity in a field name (`entity_field`'s JSON)
_CHUNK = 10_000  # the most arguments one command of a step or restore carries
_T = TypeVar("_T")


class _Meta(NamedTuple):
    applied: int  # the highest offset applied, or recorded by a cut's floor (-1: none)
    epoch: int  # the open epoch
    stepped: bool  # whether the speed group ever applied a step to the partition
    clock: int  # the partition's clock (lakehouse.dedup)
    token: str = ""  # replaced by every write of the meta hash ("": never written)


def _meta_of(applied: int, epoch: int, token: bytes | None, clock: bytes | None, stepped: bytes | None) -> _Meta:
    return _Meta(applied, epoch, stepped is not None, NO_CLOCK if clock is None else int(clock),
                 "" if token is None else token.decode())


class _Basis(NamedTuple):
    """What a read saw of one partition that a step may start from: its meta hash and its
    open epoch's blocks read (decoded; None: not in the epoch). A step that uses it skips
    reading them again; its script writes only if the token is still the one read."""

    meta: _Meta
    blocks: dict[BlockKey, dict[int, list[Any]] | None]


class _ReadBasis:
    """`StoreRead.basis` of this backend: per partition read, its `_Basis`."""

    def __init__(self) -> None:
        self.partitions: dict[int, _Basis] = {}


class RedisOnlineStore(OnlineStore):
    def __init__(self, spec: PlatformSpec, group: str, url: str, *, password: str | None = None,
                 prefix: str = "lambdalake", client: redis.Redis | None = None) -> None:
        super().__init__(spec, group)
        self.url = url
        self.prefix = prefix
        self.client: redis.Redis = client or redis.Redis.from_url(url, password=password, socket_timeout=10)
        self._read_script = self.client.register_script(_READ)
        self._step_script = self.client.register_script(_STEP)
        self._changes_script = self.client.register_script(_CHANGES)
        self._open_epochs: dict[int, int] = {}  # partition → open epoch last seen
        self._plus = {view.name: [a.plus for a in view.aggregations.values()] for view in spec.views}
        self._views = {view.name: view for view in spec.views}
        # views over the events' key entity: its events, and states, live in one partition
        self._keyed = {view.name for view in spec.views if view.entity == spec.events.key_field}
        self._strays: set[int] = set()  # partitions found to hold key entities homed elsewhere

    def _by_block(self, increments: Increments) -> dict[BlockKey, dict[int, Sequence[Any]]]:
        """Increments grouped by the block (`block_of`) that holds their buckets."""
        return by_block(self._views, increments)

    # ------------------------------------------------------------------ keys
    def _tag(self, partition: int) -> str:
        return f"{{{self.prefix}:{self.group}:{self.topic}:{partition}}}"

    def _outbox(self, partition: int) -> str:
        return f"{self._tag(partition)}:outbox"

    def _seen(self, partition: int) -> str:
        return f"{self._tag(partition)}:seen"

    def _changed(self, partition: int) -> str:
        return f"{self._tag(partition)}:changed"

    def _meta(self, partition: int) -> str:
        return f"{self._tag(partition)}:meta"

    def _epoch_key(self, partition: int, epoch: int) -> str:
        return f"{self._tag(partition)}:e{epoch}"

    def _unreachable(self, error: Exception) -> ServiceError:
        if isinstance(error, redis.exceptions.OutOfMemoryError):
            return ServiceError(
                f"the online store at {redis_location(self.url)} is full (its maxmemory) and refuses "
                "writes: raise LAMBDALAKE_REDIS_MAXMEMORY (the server's maxmemory), or shorten the spec's "
                "dedup horizon (the seen set holds one horizon of events); a batch run frees the epochs "
                "it covers")
        return ServiceError(f"the online store at {redis_location(self.url)} cannot be reached: {error}")

    # ------------------------------------------------------------------ contract
    def ping(self) -> None:
        try:
            self.client.ping()
        except redis.RedisError as error:
            raise self._unreachable(error) from error

    def applied(self, partitions: Iterable[int]) -> dict[int, int]:
        wanted = list(partitions)
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for p in wanted:
                    pipe.hget(self._meta(p), "applied")
                values = pipe.execute()
        except redis.RedisError as error:
            raise self._unreachable(error) from error
        return {p: NOTHING if v is None else int(v) for p, v in zip(wanted, values, strict=True)}

    def _step(self, partition: int, what: str, body: Callable[[Any, _Meta], _T]) -> _T:
        """Run `body(pipe, meta)` on the partition's meta hash, WATCHed: `body` reads through
        `pipe`, then queues its writes after `pipe.multi()`. Starts over when another step
        changed the partition before EXEC."""
        meta = self._meta(partition)
        try:
            with self.client.pipeline(transaction=True) as pipe:
                for _ in range(_ATTEMPTS):
                    try:
                        pipe.watch(meta)  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
                        applied, epoch, stepped, clock = pipe.hmget(meta, ["applied", "epoch", "stepped", "clock"])
                        return body(pipe, _Meta(NOTHING if applied is None else int(applied),
                                                FIRST_EPOCH if epoch is None else int(epoch), stepped is not None,
                                                NO_CLOCK if clock is None else int(clock)))
                    except redis.WatchError:
                        continue  # another step changed the partition: start over from it
        except redis.RedisError as error:
            raise self._unreachable(error) from error
        raise ServiceError(f"online store: partition {partition} changed under {_ATTEMPTS} {what} "
                           "attempts in a row")

    def apply(self, partition: int, from_offset: int, last_offset: int,
              step_above: Callable[[int], Step]) -> bool:
        return self.apply_many([(partition, from_offset, last_offset, step_above)])[partition]

    def _metas(self, partitions: list[int]) -> dict[int, _Meta]:
        with self.client.pipeline(transaction=False) as pipe:
            for p in partitions:
                pipe.hmget(self._meta(p), ["applied", "epoch", "stepped", "clock", "token"])
            answers = pipe.execute()
        return {p: _meta_of(NOTHING if applied is None else int(applied), FIRST_EPOCH if epoch is None else int(epoch),
                            token, clock, stepped)
                for p, (applied, epoch, stepped, clock, token) in zip(partitions, answers, strict=True)}

    def apply_many(self, steps: Sequence[tuple[int, int, int, Callable[[int], Step]]], *,
                   basis: object = None) -> dict[int, bool]:
        """Three round trips for all the partitions' steps: their meta hashes, the states of
        the fields they change, and one step script each (`_STEP`), which writes only if the
        partition's token is still the one read; a partition another writer changed in
        between is read and stepped again. With a read's `basis` (`StoreRead.basis`), a
        partition it read, with every block its step changes, takes both from it: one round
        trip, the script's token check making it exactly as safe."""
        done: dict[int, bool] = {}
        pending = list(steps)
        known = dict(basis.partitions) if isinstance(basis, _ReadBasis) else {}
        try:
            for _ in range(_ATTEMPTS):
                metas = self._metas([p for p, *_ in pending if p not in known])
                metas.update((p, known[p].meta) for p, *_ in pending if p in known)
                planned: list[tuple[int, int, int, Callable[[int], Step], _Meta, Step]] = []
                for p, first, last, step_above in pending:
                    meta = metas[p]
                    if meta.applied >= last:
                        done[p] = False
                        continue
                    if first > meta.applied + 1:
                        raise StoreBehindError(
                            f"the online store has partition {p} applied through offset {meta.applied}, but "
                            f"this step starts at {first}: offsets {meta.applied + 1}..{first - 1} would "
                            "be lost. Re-derive the store with `lambdalake speed rebuild`")
                    planned.append((p, first, last, step_above, meta, step_above(meta.applied)))
                if not planned:
                    return done
                grouped = [self._by_block(above.increments) for *_, above in planned]
                current = self._current_blocks(planned, grouped, known)
                known = {}  # a partition stepped again was changed since the read
                # every partition's blocks merged before any step's rows are asked for (the
                # caller may still be scoring them: `Step.rows`)
                merged = [self._merged_blocks(by_block, held) for by_block, held in zip(grouped, current, strict=True)]
                with self.client.pipeline(transaction=False) as pipe:
                    for (p, _, last, _, meta, above), blocks in zip(planned, merged, strict=True):
                        keys, args = self._step_arguments(p, last, meta, above, *blocks)
                        self._step_script(keys=keys, args=args, client=pipe)
                    answers = pipe.execute()
                pending = []
                for (p, first, last, step_above, _, _), written in zip(planned, answers, strict=True):
                    if written:
                        done[p] = True
                    else:
                        pending.append((p, first, last, step_above))
                if not pending:
                    return done
        except redis.RedisError as error:
            raise self._unreachable(error) from error
        raise ServiceError(f"online store: partitions {sorted(p for p, *_ in pending)} changed under "
                           f"{_ATTEMPTS} step attempts in a row")

    def _current_blocks(self, planned: Sequence[tuple[Any, ...]], grouped: list[dict[BlockKey, Any]],
                        known: Mapping[int, _Basis]) -> list[list[dict[int, list[Any]] | None]]:
        """Per planned step, its blocks' states in the open epoch (None: not there): from the
        read's basis where it holds them all, else read (one round trip for the rest)."""
        out: list[list[dict[int, list[Any]] | None] | None] = []
        asked: list[int] = []
        with self.client.pipeline(transaction=False) as pipe:
            for i, ((p, *_, meta, _above), by_block) in enumerate(zip(planned, grouped, strict=True)):
                held = known[p].blocks if p in known else None
                if held is not None and all(key in held for key in by_block):
                    out.append([held[key] for key in by_block])
                    continue
                out.append(None)
                asked.append(i)
                pipe.hmget(self._epoch_key(p, meta.epoch), [block_field(*key) for key in by_block] or ["\x00"])
            answers = pipe.execute() if asked else []
        for i, raw in zip(asked, answers, strict=True):
            out[i] = [None if value is None else _BUCKETS.decode(value) for value in raw[:len(grouped[i])]]
        return [held or [] for held in out]

    def _merged_blocks(self, by_block: dict[BlockKey, dict[int, Sequence[Any]]],
                       held_blocks: Sequence[dict[int, list[Any]] | None]) -> tuple[list[Any], list[Any]]:
        """A step's increments merged with their blocks' current states (in the open epoch;
        None: not there): field/value pairs to write, and index field/block pairs of the
        blocks new in the epoch (added to their (view, entity)'s index)."""
        fields: list[Any] = []
        indexed: list[Any] = []
        for (key, increments), held in zip(by_block.items(), held_blocks, strict=True):
            view, entity, block = key
            if held is None:
                buckets: dict[int, list[Any]] = {}
                indexed += [entity_field(view, entity), block]
            else:
                buckets = held
            adders = self._plus[view]
            for bucket, states in increments.items():
                current = buckets.get(bucket)
                buckets[bucket] = list(states) if current is None else [
                    add(c, x) for add, c, x in zip(adders, current, states, strict=True)]
            fields += [block_field(view, entity, block), _ENCODE(buckets)]
        return fields, indexed

    def _step_arguments(self, partition: int, last: int, meta: _Meta, above: Step, fields: list[Any],
                        indexed: list[Any]) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of `_STEP`."""
        clock, below = self._clock_after(meta.clock, above.seen.values())
        rows = [x for offset, row in above.encoded_rows().items() for x in (offset, row)]
        seen = [x for identity, c in above.seen.items() for x in (c, identity)]
        keys = [self._meta(partition), self._epoch_key(partition, meta.epoch), self._changed(partition),
                self._outbox(partition), self._seen(partition)]
        return keys, [meta.token, _token(), last, meta.epoch, clock, "" if below is None else below,
                      above.homed, len(fields) // 2, *fields, len(rows) // 2, *rows, len(seen) // 2, *seen,
                      len(indexed) // 2, *indexed]

    def _remember(self, pipe: Any, partition: int, clock: int, taken: Iterable[tuple[str, int]]) -> int:
        """Queue adding `taken` (identity, clock) to the seen set and forgetting what falls
        behind the horizon of the partition's new clock; return that clock."""
        items = list(taken)
        for start in range(0, len(items), 10_000):
            pipe.zadd(self._seen(partition), dict(items[start:start + 10_000]))
        clock, below = self._clock_after(clock, [c for _, c in items])
        if items and below is not None:
            pipe.zremrangebyscore(self._seen(partition), "-inf", f"({below}")
        return clock

    def _clock_after(self, clock: int, taken: Iterable[int]) -> tuple[int, int | None]:
        """The partition's clock after a step that took events of these clocks, and the
        lowest clock its seen set keeps from then on (None: all)."""
        clock = max([clock, *taken])
        return clock, forgettable_below(clock, self.spec.events.dedup_horizon_ms)

    def seen(self, identities: Mapping[int, Sequence[str]]) -> Seen:
        """The look-up `read` makes with `identities`: each partition's atomically with its
        clock, in one script per partition (one slot each: no transaction across slots)."""
        asked = sorted(p for p, ids in identities.items() if ids)
        # no states are asked for: the open epoch's key alone (the script asks for more when
        # a cut opened a newer one since), whatever the number of epochs ever opened
        after = {p: self._open_epochs.get(p, FIRST_EPOCH) - 1 for p in asked}
        return self.read((), asked, after, identities=identities).seen if asked else {}

    def cut(self, partition: int, *, floor: int = NOTHING,
            remember: Callable[[int], Iterable[tuple[str, int]]] | None = None) -> Cut:
        def step(pipe: Any, meta: _Meta) -> Cut:
            epoch = meta.epoch
            at = max(floor, meta.applied) if not meta.stepped else meta.applied
            passed = list(remember(meta.applied)) if remember is not None and at > meta.applied else []
            pipe.multi()
            clock = self._remember(pipe, partition, meta.clock, passed)
            jumped = {f"floor:{epoch}": meta.applied} if at > meta.applied else {}  # see _PROLOGUE
            pipe.hset(self._meta(partition), mapping={"applied": at, "epoch": epoch + 1, f"cut:{epoch}": at,
                                                      "clock": clock, "token": _token(), **jumped})
            pipe.execute()
            self._open_epochs[partition] = epoch + 1
            return Cut(partition, epoch, at)

        return self._step(partition, "cut", step)

    def pending(self, partition: int) -> tuple[int, list[bytes]]:
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.hget(self._meta(partition), "applied")
                pipe.zrange(self._outbox(partition), 0, -1)
                applied, rows = pipe.execute()
        except redis.RedisError as error:
            raise self._unreachable(error) from error
        return (NOTHING if applied is None else int(applied)), list(rows)

    def flushed(self, partition: int, through: int) -> None:
        try:
            self.client.zremrangebyscore(self._outbox(partition), "-inf", through)
        except redis.RedisError as error:
            raise self._unreachable(error) from error

    def _read_partitions(self, partitions: list[int], after: Mapping[int, int],
                         arguments: list[Any]) -> dict[int, tuple[int, int, bool, list[Any]]]:
        """Per partition: (applied, open epoch, floored, [meta, seen, per epoch after `after[p]`
        read: the script's values]); `arguments`: `_READ`'s after the first two (no key entity
        left out)."""
        return self._run_script(partitions, after,
                                lambda p: ([self._seen(p)], [after.get(p, 0), 0, *arguments]), self._read_script)

    def _run_script(self, partitions: list[int], after: Mapping[int, int],
                    extra: Callable[[int], tuple[list[str], list[Any]]],
                    script: Any) -> dict[int, tuple[int, int, bool, list[Any]]]:
        """Run `script` once per partition, pipelined, with KEYS = meta, `extra(p)`'s keys, then
        the epoch hashes after `after[p]` through the open epoch last seen, and ARGV =
        `extra(p)`'s arguments; partitions whose script found a newer open epoch, or found
        that the reader left out key entities it holds (not homed: the partition joins
        `_strays`), are read again. Per partition: (applied, open epoch, floored, the rest of the script's
        answer); floored: a floored cut after `after[p]` ends what the reader may see (see
        `_PROLOGUE`), and `applied` is the offset before its jump."""
        pending = list(partitions)
        out: dict[int, tuple[int, int, bool, list[Any]]] = {}
        for _ in range(_ATTEMPTS):
            try:
                with self.client.pipeline(transaction=False) as pipe:
                    for p in pending:
                        first = after.get(p, 0) + 1
                        last = max(first, self._open_epochs.get(p, FIRST_EPOCH))
                        keys, args = extra(p)
                        epochs = [self._epoch_key(p, e) for e in range(first, last + 1)]
                        script(keys=[self._meta(p), *keys, *epochs], args=args, client=pipe)
                    answers = pipe.execute()
            except redis.RedisError as error:
                raise self._unreachable(error) from error
            stale = []
            for p, answer in zip(pending, answers, strict=True):
                applied, epoch, too_few = int(answer[0]), int(answer[1]), int(answer[2])
                self._open_epochs[p] = max(epoch, self._open_epochs.get(p, FIRST_EPOCH))
                if too_few:
                    if too_few == 2:
                        self._strays.add(p)
                    stale.append(p)
                else:
                    out[p] = (applied, epoch, bool(int(answer[3])), list(answer[4:]))
            if not stale:
                return out
            pending = stale  # a cut opened an epoch since: read those partitions again
        raise ServiceError("online store: epochs kept opening during a read")

    def read(self, keys: Iterable[StateKey], partitions: Iterable[int],
             after: Mapping[int, int], *, whole: bool = False,
             identities: Mapping[int, Sequence[str]] | None = None) -> StoreRead:
        """See `OnlineStore.read`. Where the partitions are the topic's (0..count-1), a key
        entity's blocks are asked of its home partition only (`home_partition`), and each
        partition's script that was not asked for some of them checks, atomically with the
        read, that every step of it was homed under that count (`Step.homed`), so that it
        holds none of them; a partition that was not is read for every key (and remembered:
        `_strays`)."""
        wanted = list(partitions)
        views, keyed = self._views, self._keyed
        count = len(wanted) if wanted == list(range(len(wanted))) else 0
        items: list[Any] = list(dict.fromkeys((v, e) for v, e, _ in keys)) if whole else \
            list(dict.fromkeys((view, entity, block_of(views[view], bucket)) for view, entity, bucket in keys))
        # each item's field, named once however many partitions are asked for it
        fields = [entity_field(v, e) for v, e in items] if whole else [block_field(*k) for k in items]
        shared: tuple[list[Any], list[str]] = ([], [])  # (items, fields) asked of every partition
        homed: dict[int, tuple[list[Any], list[str]]] = {}  # of their home partition only
        for item, name in zip(items, fields, strict=True):
            view, entity = item[0], item[1]
            if count and view in keyed and isinstance(entity, str):
                at = home_partition(entity, count)
                mine = homed.get(at)
                if mine is None:
                    mine = homed[at] = ([], [])
            else:
                mine = shared
            mine[0].append(item)
            mine[1].append(name)
        asked: dict[int, list[Any]] = {}  # partition → the items its (last) script was asked
        looked_up = {p: list(ids) for p, ids in (identities or {}).items() if ids}

        def arguments(p: int) -> tuple[list[str], list[Any]]:
            # the check matters only where key entities were left out (homed elsewhere)
            homing = count if count and homed and p not in self._strays else 0
            if homing:
                home = homed.get(p, ([], []))
                asked[p], names = shared[0] + home[0], shared[1] + home[1]
            else:
                asked[p], names = items, fields
            ids = looked_up.get(p, ())
            if whole:
                return [self._seen(p)], [after.get(p, 0), homing, 0, len(ids), *ids, *names]
            return [self._seen(p)], [after.get(p, 0), homing, len(names), len(ids), *names, *ids]

        answers = self._run_script(wanted, after, arguments, self._read_script)
        blocks: BlockStates = {}
        coverage, epochs = {}, {}
        plus = self._plus
        floored = set()
        basis = _ReadBasis()
        summed: set[BlockKey] = set()  # blocks held as a sum of this read's own (not a decoded value)

        def merge(key: BlockKey, raw: bytes) -> dict[int, list[Any]]:
            """Add a block's value to its sum; the decoded value, which is never changed."""
            buckets = _BUCKETS.decode(raw)
            held = blocks.get(key)
            if held is None:
                blocks[key] = buckets  # usually the only one: a key entity's, of one epoch
                return buckets
            if key not in summed:
                held = blocks[key] = dict(held)
                summed.add(key)
            adders = plus[key[0]]
            for bucket, value in buckets.items():
                current = held.get(bucket)
                held[bucket] = value if current is None else [
                    add(c, x) for add, c, x in zip(adders, current, value, strict=True)]
            return buckets

        seen: Seen = {}
        for p, (applied, epoch, jumped, (meta, scores, *per_epoch)) in answers.items():
            coverage[p], epochs[p] = applied, epoch
            if p in looked_up:
                seen[p] = (NO_CLOCK if meta[1] is None else int(meta[1]),
                           {identity: int(float(score)) for identity, score in zip(looked_up[p], scores, strict=True)
                            if score is not None})
            if jumped:
                floored.add(p)
            n = 0 if whole else len(asked[p])
            # the open epoch's blocks as read, for a step of this partition (`_Basis`)
            open_at = epoch - after.get(p, 0) - 1 if n and not jumped else -1
            opened: dict[BlockKey, dict[int, list[Any]] | None] | None = None
            for k, values in enumerate(per_epoch):
                if k == open_at:
                    opened = {}
                for key, raw in zip(asked[p][:n], values[:n], strict=True):
                    decoded = None if raw is None else merge(key, raw)
                    if opened is not None:
                        # a copy: a step merges its increments into it
                        opened[key] = None if decoded is None else dict(decoded)
                for i in range(n, len(values), 2):  # the blocks of the pairs read whole
                    merge(decode_block_field(values[i]), values[i + 1])
                if opened is not None and k == open_at:
                    basis.partitions[p] = _Basis(_meta_of(applied, epoch, *meta), opened)
                    opened = None
        return StoreRead(blocks, coverage, epochs, floored, basis, seen)

    def scan(self, partition: int, after: int) -> tuple[int, Iterator[tuple[StateKey, list[Any]]]]:
        applied, _, _, (_, _, *per_epoch) = self._read_partitions([partition], {partition: after}, [-1, 0])[partition]

        def states() -> Iterator[tuple[StateKey, list[Any]]]:
            merged: dict[StateKey, list[Any]] = {}
            for flat in per_epoch:
                for i in range(0, len(flat), 2):
                    if is_index_field(flat[i]):
                        continue
                    view, entity, _ = decode_block_field(flat[i])
                    for bucket, value in _BUCKETS.decode(flat[i + 1]).items():
                        merge_into(self.spec, merged, (view, entity, bucket), value)
            yield from merged.items()

        return applied, states()

    def changes(self, since: Mapping[int, int], after: Mapping[int, int]) -> dict[int, Changes]:
        answers = self._run_script(
            list(since), after, lambda p: ([self._changed(p)], [after.get(p, 0), since[p]]), self._changes_script)
        out = {}
        for p, (applied, epoch, _, rest) in answers.items():
            fields, per_epoch = rest[0], rest[1:]
            blocks: BlockStates = {}
            for i, field in enumerate(fields):
                key = decode_block_field(field)
                view = key[0]
                buckets: dict[int, list[Any]] = {}
                for values in per_epoch:
                    if values[i] is None:
                        continue
                    decoded = _BUCKETS.decode(values[i])
                    if not buckets:  # the first epoch that holds the entity (usually the only one)
                        buckets = decoded
                        continue
                    adders = self._plus[view]
                    for bucket, states in decoded.items():
                        current = buckets.get(bucket)
                        buckets[bucket] = states if current is None else [
                            add(c, x) for add, c, x in zip(adders, current, states, strict=True)]
                blocks[key] = buckets
            out[p] = Changes(applied, epoch, blocks)
        return out

    def drop_epochs(self, partition: int, through: int) -> int:
        meta = self._meta(partition)
        try:
            epoch_raw = self.client.hget(meta, "epoch")
            open_epoch = FIRST_EPOCH if epoch_raw is None else int(epoch_raw)
            last = min(through, open_epoch - 1)
            doomed = [self._epoch_key(partition, e) for e in range(FIRST_EPOCH, last + 1)]
            if doomed:
                cut = self.client.hget(meta, f"cut:{last}")  # written once, by the cut of epoch `last`
                with self.client.pipeline(transaction=True) as pipe:
                    pipe.unlink(*doomed)
                    if cut is not None:  # a restored partition has no cut of the epochs before it
                        pipe.zremrangebyscore(self._changed(partition), "-inf", int(cut))
                    pipe.execute()
        except redis.RedisError as error:
            raise self._unreachable(error) from error
        return len(doomed)

    def restore(self, partition: int, *, epoch: int, applied: int, increments: Increments,
                seen: Mapping[str, int]) -> None:

        def step(pipe: Any, meta: _Meta) -> None:
            if meta.stepped or meta.applied != NOTHING or meta.epoch != FIRST_EPOCH:
                pipe.unwatch()
                raise ServiceError(f"online store: partition {partition} holds state (applied through "
                                   f"{meta.applied}, epoch {meta.epoch}); wipe the group first")
            by_block = self._by_block(increments)
            pipe.multi()
            fields = {block_field(*key): _ENCODE(buckets) for key, buckets in by_block.items()}
            index: dict[str, list[str]] = {}
            for view, entity, block in by_block:
                index.setdefault(entity_field(view, entity), []).append(str(block))
            items = list(fields.items())
            for start in range(0, len(items), _CHUNK):
                chunk = dict(items[start:start + _CHUNK])
                pipe.hset(self._epoch_key(partition, epoch), mapping=chunk)
                pipe.zadd(self._changed(partition), dict.fromkeys(chunk, applied))
            indexes = [(name, ",".join(blocks)) for name, blocks in index.items()]
            for start in range(0, len(indexes), _CHUNK):
                pipe.hset(self._epoch_key(partition, epoch), mapping=dict(indexes[start:start + _CHUNK]))
            clock = self._remember(pipe, partition, NO_CLOCK, seen.items())
            pipe.hset(self._meta(partition), mapping={"applied": applied, "epoch": epoch, "stepped": 1,
                                                      "clock": clock, "token": _token()})
            pipe.execute()
            self._open_epochs[partition] = epoch

        self._step(partition, "restore", step)

    def wipe(self) -> None:
        try:
            doomed = list(self.client.scan_iter(match=f"{{{self.prefix}:{self.group}:{self.topic}:*",
                                                count=1000))
            for start in range(0, len(doomed), 500):
                self.client.unlink(*doomed[start:start + 500])
        except redis.RedisError as error:
            raise self._unreachable(error) from error
        self._open_epochs.clear()
        self._strays.clear()


@functools.lru_cache(maxsize=1 << 16)
def entity_field(view: str, entity: Any) -> str:
    """The index field of one (view, entity): its blocks' starts. Cached: a micro-batch's and
    a refresh's entities are mostly the recent ones again."""
    return f"{view}\x1f{json.dumps(entity, separators=(',', ':'))}"


@functools.lru_cache(maxsize=1 << 17)
def block_field(view: str, entity: Any, block: int) -> str:
    """The field of one block (`block_of`): its buckets' states."""
    return f"{entity_field(view, entity)}\x1f{block}"


@functools.lru_cache(maxsize=1 << 17)
def decode_block_field(field: str | bytes) -> BlockKey:
    text = field.decode() if isinstance(field, bytes) else field
    view, entity, block = text.split("\x1f")
    return view, _ENTITY(entity), int(block)


def is_index_field(field: bytes) -> bool:
    return field.count(b"\x1f") == 1


def _token() -> str:
    return os.urandom(8).hex()


def redis_location(url: str) -> str:
    """A Redis URL without its password (for messages and logs)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rsplit('@', 1)[-1]}" if rest else url
