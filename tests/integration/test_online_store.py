"""The online store on a real redis-server (started here, on a free loopback port): exactly-
once steps per partition, epochs cut without subtraction, atomic reads with their coverage,
and the merge of gold ⊕ the epochs after a cut against a plain recomputation."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from lakehouse.errors import ServiceError
from lakehouse.fraud import FRAUD_SPEC
from lakehouse.online.base import NOTHING, BlockKey, Changes, StateKey, Step, StoreBehindError, block_of, merge_into
from lakehouse.online.base import increments_of as production_increments
from lakehouse.online.redis_store import RedisOnlineStore, redis_location
from lakehouse.recompute import states_by_view
from lakehouse.streams import home_partition
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration

SPEC = FRAUD_SPEC
TIME = SPEC.events.time_field




@pytest.fixture
def store(redis_url: str, request: pytest.FixtureRequest) -> RedisOnlineStore:
    created = RedisOnlineStore(SPEC, f"test-{request.node.name}", redis_url)
    created.wipe()
    return created


def _event(i: int, user: str, merchant: str, amount: int, time_ms: int) -> dict[str, Any]:
    return {"event_id": f"e{i}", "user_id": user, "merchant_id": merchant, "merchant_category": "grocery",
            "amount": amount, "currency": "EUR", "country": "DE", "channel": "pos", TIME: time_ms}


def increments_of(events: list[dict[str, Any]]) -> dict[StateKey, list[Any]]:
    """The plain recomputation (`lakehouse.recompute`, not the monoids' fold) of a list of
    events' states, per (view, entity, bucket)."""
    tables = states_by_view(SPEC.views, events, TIME)
    return {(view.name, entity, bucket): [states[a] for a in view.aggregations]
            for view in SPEC.views for (entity, bucket), states in tables[view.name].items()}


def batches(seed: int, partitions: int, n: int) -> dict[int, list[tuple[int, dict[str, Any]]]]:
    rng = random.Random(seed)
    out: dict[int, list[tuple[int, dict[str, Any]]]] = {p: [] for p in range(partitions)}
    for i in range(n):
        p = rng.randrange(partitions)
        event = _event(i, f"u{rng.randrange(5)}", f"m{rng.randrange(3)}", rng.randrange(1, 10**9),
                       1_767_225_600_000 + rng.randrange(10 * 86_400_000))
        out[p].append((len(out[p]), event))
    return out


def step(store: RedisOnlineStore, partition: int, events: list[tuple[int, dict[str, Any]]]) -> bool:
    """Apply the records a member consumed: `events`, (offset, event) from its position on."""
    def above(applied: int) -> Step:
        fresh = [(o, e) for o, e in events if o > applied]
        return Step(production_increments(SPEC, [e for _, e in fresh]),
                    {o: f"row {o}".encode() for o, _ in fresh}, {e["event_id"]: o for o, e in fresh})

    return store.apply(partition, events[0][0], events[-1][0], above)


def every_key(events: list[dict[str, Any]]) -> list[StateKey]:
    return list(increments_of(events))


def test_a_step_at_or_below_the_applied_offset_changes_nothing(store: RedisOnlineStore) -> None:
    events = [(o, e) for o, e in batches(1, 1, 200)[0]]
    assert step(store, 0, events[:100])
    before = store.read(every_key([e for _, e in events]), [0], {})
    assert not step(store, 0, events[:100])  # redelivered after a crash: a no-op
    assert not step(store, 0, events[:60])
    assert store.read(every_key([e for _, e in events]), [0], {}) == before
    # a batch overlapping the applied offset adds only what lies above it
    assert step(store, 0, events[50:200])
    assert store.read(every_key([e for _, e in events]), [0], {}).states == increments_of([e for _, e in events])
    assert store.applied([0, 1]) == {0: 199, 1: -1}


def test_reads_equal_a_recomputation_across_partitions_and_epochs(store: RedisOnlineStore) -> None:
    """Increments are kept per epoch: gold up to each partition's cut ⊕ the epochs after it
    equals a recomputation of every event, for every monoid (max and min included)."""
    parts = batches(2, 3, 900)
    keys = every_key([e for events in parts.values() for _, e in events])
    cuts = {}
    for p, events in parts.items():
        half = len(events) // 2
        for start in range(0, half, 40):
            step(store, p, events[start:min(start + 40, half)])
        cuts[p] = store.cut(p)
        assert cuts[p].offset == half - 1
        for start in range(half, len(events), 40):
            step(store, p, events[start:start + 40])
    gold = increments_of([e for p, events in parts.items() for o, e in events if o <= cuts[p].offset])
    after = {p: c.epoch for p, c in cuts.items()}
    read = store.read(keys, parts, after)
    merged = dict(gold)
    for key, states in read.states.items():
        merge_into(SPEC, merged, key, states)
    assert merged == increments_of([e for events in parts.values() for _, e in events])
    assert read.coverage == {p: len(events) - 1 for p, events in parts.items()}
    # every epoch (no cut taken into account) is the whole history
    assert store.read(keys, parts, {}).states == increments_of([e for events in parts.values() for _, e in events])
    # a scan of one partition after its cut holds exactly its events above the cut
    applied, scanned = store.scan(1, cuts[1].epoch)
    assert applied == len(parts[1]) - 1
    assert dict(scanned) == increments_of([e for o, e in parts[1] if o > cuts[1].offset])


def test_a_cut_of_a_partition_never_applied_records_the_floor(store: RedisOnlineStore) -> None:
    cut = store.cut(2, floor=41)
    assert (cut.epoch, cut.offset) == (1, 41)
    assert store.applied([2]) == {2: 41}  # the group resumes after what the run covers
    events = batches(3, 1, 60)[0]
    assert not step(store, 2, events[:42])  # offsets 0..41 are the run's
    assert step(store, 2, events)
    assert store.read(every_key([e for _, e in events]), [2], {2: cut.epoch}).states == \
        increments_of([e for o, e in events if o > 41])
    assert store.cut(0, floor=-1).offset == -1  # an empty partition, never consumed
    assert store.cut(0, floor=10).offset == 10  # records arrived since; the group still never ran
    step(store, 0, events[:20])
    assert store.cut(0, floor=99).offset == 19  # the group runs: its applied offset is the cut


def test_dropping_closed_epochs_keeps_what_readers_of_the_newest_cut_need(store: RedisOnlineStore) -> None:
    events = batches(4, 1, 300)[0]
    step(store, 0, events[:100])
    first = store.cut(0)
    step(store, 0, events[100:200])
    second = store.cut(0)
    step(store, 0, events[200:])
    assert store.drop_epochs(0, second.epoch + 5) == 2  # never the open epoch
    keys = every_key([e for _, e in events])
    assert store.read(keys, [0], {0: second.epoch}).states == increments_of([e for o, e in events if o > 199])
    assert store.read(keys, [0], {0: first.epoch}).states == increments_of([e for o, e in events if o > 199])


def test_concurrent_steps_of_one_partition_apply_each_event_once(store: RedisOnlineStore) -> None:
    """Three members of one partition at once, as after rebalances (the fenced ones are
    zombies): each consumes from where the store stood when it (re)started, in batches of
    random size, and restarts from the store now and then. Each event is counted once."""
    events = batches(5, 1, 2000)[0]
    errors: list[BaseException] = []

    def member(seed: int) -> None:
        rng = random.Random(seed)
        try:
            position = store.applied([0])[0] + 1
            while position < len(events):
                end = min(len(events), position + rng.randrange(1, 80))
                step(store, 0, events[position:end])
                position = end if rng.random() > 0.1 else store.applied([0])[0] + 1
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    threads = [threading.Thread(target=member, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert store.read(every_key([e for _, e in events]), [0], {}).states == increments_of([e for _, e in events])


def test_steps_of_several_partitions_sent_together_race_cuts_and_each_other(store: RedisOnlineStore) -> None:
    """`apply_many` (the speed layer's one call per micro-batch) from two members over three
    partitions while cuts keep opening epochs: a step whose partition changed after it read
    it writes nothing and starts over, so each event is counted once, in some epoch."""
    parts = batches(6, 3, 600)
    errors: list[BaseException] = []
    stop = threading.Event()

    def member(seed: int) -> None:
        rng = random.Random(seed)
        try:
            positions = {p: store.applied([p])[p] + 1 for p in parts}
            while any(positions[p] < len(parts[p]) for p in parts):
                steps = []
                for p, events in parts.items():
                    if positions[p] >= len(events):
                        continue
                    end = min(len(events), positions[p] + rng.randrange(1, 60))
                    chunk = events[positions[p]:end]

                    def above(applied: int, chunk: list[tuple[int, dict[str, Any]]] = chunk) -> Step:
                        fresh = [(o, e) for o, e in chunk if o > applied]
                        return Step(production_increments(SPEC, [e for _, e in fresh]), {},
                                    {e["event_id"]: o for o, e in fresh})

                    steps.append((p, chunk[0][0], chunk[-1][0], above))
                    positions[p] = end
                if seed:  # as the speed layer does: the step starts from what a read saw
                    keys = every_key([e for p, *_ in steps for _, e in parts[p]])
                    store.apply_many(steps, basis=store.read(keys, list(parts), {}).basis)
                else:
                    store.apply_many(steps)
                if rng.random() < 0.1:  # a restart: resume where the store stands
                    positions = {p: store.applied([p])[p] + 1 for p in parts}
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    def cutter() -> None:
        while not stop.is_set():
            for p in parts:
                store.cut(p)
            time.sleep(0.01)

    threads = [threading.Thread(target=member, args=(s,)) for s in range(2)]
    cutting = threading.Thread(target=cutter)
    cutting.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    cutting.join(10)
    assert not errors
    for p, events in parts.items():
        assert store.applied([p])[p] == len(events) - 1
        assert store.read(every_key([e for _, e in events]), [p], {}).states == increments_of([e for _, e in events])


def test_a_step_from_a_reads_basis_skips_reading_again_unless_the_partition_changed_since(
        store: RedisOnlineStore) -> None:
    """A step given a read's basis (`StoreRead.basis`) takes the partition's meta hash and
    blocks from it, no round trip of its own; where another member stepped the partition,
    or a cut opened an epoch, after that read, the step notices (the token), reads again
    and counts each event once, in the open epoch."""
    parts = batches(8, 2, 480)
    rival = RedisOnlineStore(SPEC, store.group, store.url)
    metas_read: list[list[int]] = []
    own_metas = store._metas
    store._metas = lambda partitions: metas_read.append(list(partitions)) or own_metas(partitions)  # type: ignore[method-assign]
    cuts = {}
    for p, events in parts.items():
        for n, start in enumerate(range(0, len(events), 30)):
            chunk = events[start:start + 30]
            read = store.read(every_key([e for _, e in chunk]), list(parts), {})
            metas_read.clear()
            if n == 3:  # another member took the partition over and stepped half of it
                assert step(rival, p, chunk[:20])
            if n == 6:  # a batch run cut the partition between the read and the step
                cuts[p] = store.cut(p)

            def above(applied: int, chunk: list[tuple[int, dict[str, Any]]] = chunk) -> Step:
                fresh = [(o, e) for o, e in chunk if o > applied]
                return Step(production_increments(SPEC, [e for _, e in fresh]), {},
                            {e["event_id"]: o for o, e in fresh})

            assert store.apply_many([(p, chunk[0][0], chunk[-1][0], above)], basis=read.basis) == {p: True}
            assert [m for m in metas_read if m] == ([[p]] if n in (3, 6) else [])
    for p, events in parts.items():
        everything = [e for _, e in events]
        assert store.read(every_key(everything), [p], {}).states == increments_of(everything)
        # the steps after the cut went to the epoch it opened
        above_cut = [e for o, e in events if o > cuts[p].offset]
        assert store.read(every_key(everything), [p], {p: cuts[p].epoch}).states == increments_of(above_cut)


def test_a_read_returns_the_blocks_of_its_keys_and_a_whole_read_every_bucket(store: RedisOnlineStore) -> None:
    """A view's states of one entity are kept in blocks one window wide: a key reads its
    block only, a step rewrites only the blocks its events fall in (no field outgrows one
    window, whatever the entity's history), and a whole read follows each pair's index to
    every block, across epochs and partitions, equal to a recomputation."""
    parts = batches(11, 2, 800)
    cuts = {}
    for p, events in parts.items():
        half = len(events) // 2
        for start in range(0, len(events), 50):
            if start == half - half % 50:
                cuts[p] = store.cut(p)
            step(store, p, events[start:start + 50])
    everything = increments_of([e for events in parts.values() for _, e in events])
    view = SPEC.view("user_10m")
    entity_buckets = sorted(b for v, e, b in everything if (v, e) == (view.name, "u0"))
    bucket = entity_buckets[len(entity_buckets) // 2]
    read = store.read([(view.name, "u0", bucket)], parts, {})
    block = block_of(view, bucket)
    assert read.states == {k: v for k, v in everything.items()
                           if k[:2] == (view.name, "u0") and block_of(view, k[2]) == block}
    assert len(read.states) < len(entity_buckets)
    asked = [(v.name, entity, 0) for v in SPEC.views for entity in (("u0", "u3") if v.entity == "user_id" else ("m1",))]
    pairs = {(v, e) for v, e, _ in asked}
    assert store.read(asked, parts, {}, whole=True).states == \
        {k: v for k, v in everything.items() if k[:2] in pairs}
    above = increments_of([e for p, events in parts.items() for o, e in events if o > cuts[p].offset])
    after = {p: c.epoch for p, c in cuts.items()}
    assert store.read(asked, parts, after, whole=True).states == {k: v for k, v in above.items() if k[:2] in pairs}
    for p in parts:
        for epoch in (1, 2):
            held_fields: dict[bytes, bytes] = store.client.hgetall(store._epoch_key(p, epoch))  # type: ignore[assignment]
            for field, raw in held_fields.items():
                if field.count(b"\x1f") == 2:  # a block, not an index
                    held = SPEC.view(field.split(b"\x1f")[0].decode())
                    assert len(json.loads(raw)) <= (held.window_buckets or 1)


def test_a_key_entity_is_read_from_its_home_partition_while_every_step_there_was_homed(
        store: RedisOnlineStore) -> None:
    """A key entity's events come from its home partition (Kafka's default partitioner), so a
    read asks only that partition for it, and each partition's script checks, atomically,
    that every step of it said so (`Step.homed`). A step that did not (an event in another
    partition: a producer with another partitioner), or a reader assuming another partition
    count, makes that partition be read for every key: the answer stays exact."""
    count = 3
    events = [_event(i, f"u{i % 40}", f"m{i % 4}", 100 + i, 1_767_225_600_000 + i * 60_000) for i in range(600)]
    homes: dict[int, list[dict[str, Any]]] = {p: [] for p in range(count)}
    for event in events:
        homes[home_partition(event["user_id"], count)].append(event)
    def homed_step(mine: list[dict[str, Any]]) -> Callable[[int], Step]:
        return lambda applied: Step(production_increments(SPEC, mine), {}, {}, count)

    for p, mine in homes.items():
        assert store.apply(p, 0, len(mine) - 1, homed_step(mine))
    keys = every_key(events)
    assert store.read(keys, range(count), {}).states == increments_of(events)
    assert not store._strays
    elsewhere = next(p for p in range(count) if p != home_partition("u0", count))
    stray = _event(999, "u0", "m0", 7, 1_767_225_600_000)
    assert store.apply(elsewhere, len(homes[elsewhere]), len(homes[elsewhere]),
                       lambda applied: Step(production_increments(SPEC, [stray]), {}, {}, 0))
    reader = RedisOnlineStore(SPEC, store.group, store.url)  # knows of no stray partition yet
    assert reader.read(keys, range(count), {}).states == increments_of([*events, stray])
    assert reader._strays == {elsewhere}
    asked = [(v.name, "u0", 0) for v in SPEC.views]
    assert reader.read(asked, range(count), {}, whole=True).states == \
        {k: v for k, v in increments_of([*events, stray]).items() if k[1] == "u0" and k[0] != "merchant_all"}
    # two of the three partitions: homed under 3, not 2, so both are read for every key
    other = RedisOnlineStore(SPEC, store.group, store.url)
    first_two = [*homes[0], *homes[1], *([stray] if elsewhere < 2 else [])]
    assert other.read(keys, range(2), {}).states == increments_of(first_two)
    assert other._strays == {0, 1}


def test_a_read_of_more_fields_than_lua_can_unpack_at_once(store: RedisOnlineStore) -> None:
    """A micro-batch of many distinct entities asks for tens of thousands of fields."""
    events = [(o, {**e, "user_id": f"u{o}"}) for o, e in batches(9, 1, 12_000)[0]]
    step(store, 0, events)
    keys = every_key([e for _, e in events])
    assert len({(v, e) for v, e, _ in keys}) > 20_000
    assert store.read(keys, [0, 1], {}).states == increments_of([e for _, e in events])


def test_readers_of_an_older_run_see_a_floored_partition_up_to_the_jump(store: RedisOnlineStore) -> None:
    """A run floors partition 1, never stepped, at 40, and the speed layer steps 41.. into
    the next epoch: the offsets up to 40 are in no epoch (only in that run's views), so a
    reader of the run before sees partition 1 as of the offset before the jump, and none of
    the later epochs; a reader of the floored run sees everything after its cut."""
    events = batches(10, 2, 300)
    step(store, 0, events[0][:30])
    old = {p: store.cut(p, floor=-1).epoch for p in (0, 1)}  # the older run: 0 at 29, 1 never applied
    floored = {p: store.cut(p, floor=40).epoch for p in (0, 1)}  # 1 jumps to 40; 0 was stepped: at 29
    assert store.applied([0, 1]) == {0: 29, 1: 40}
    step(store, 1, events[1][41:60])
    step(store, 0, events[0][30:50])
    keys = every_key([e for p in (0, 1) for _, e in events[p]])
    older = store.read(keys, [0, 1], old)
    assert older.coverage == {0: 49, 1: -1} and older.floored == {1}
    assert older.states == increments_of([e for _, e in events[0][30:50]])
    newer = store.read(keys, [0, 1], floored)
    assert newer.coverage == {0: 49, 1: 59} and newer.floored == set()
    assert newer.states == increments_of([e for _, e in events[0][30:50] + events[1][41:60]])
    assert store.scan(1, old[1])[0] == -1 and store.scan(1, floored[1])[0] == 59
    assert store.changes({1: -1}, {1: old[1]})[1].applied == -1


def test_a_step_that_would_leave_a_gap_is_refused(store: RedisOnlineStore) -> None:
    events = batches(7, 1, 100)[0]
    step(store, 0, events[:30])
    with pytest.raises(StoreBehindError, match=r"applied through offset 29, but this step starts at 40"):
        step(store, 0, events[40:60])
    assert store.applied([0]) == {0: 29}


def test_a_read_after_a_cut_it_did_not_see_reads_the_new_epoch(store: RedisOnlineStore, redis_url: str) -> None:
    events = batches(6, 1, 100)[0]
    step(store, 0, events[:50])
    reader = RedisOnlineStore(SPEC, store.group, redis_url)
    keys = every_key([e for _, e in events])
    assert reader.read(keys, [0], {}).epochs == {0: 1}
    store.cut(0)
    step(store, 0, events)  # into epoch 2, which the reader has not seen open
    read = reader.read(keys, [0], {})
    assert read.epochs == {0: 2} and read.coverage == {0: 99}
    assert read.states == increments_of([e for _, e in events])


def test_the_outbox_and_the_seen_set_take_each_record_once(store: RedisOnlineStore) -> None:
    """A step's rows wait in the outbox until flushed; a replayed or overlapping step adds
    none twice, and the seen set knows exactly the applied events' identities."""
    events = batches(8, 1, 120)[0]
    step(store, 0, events[:80])
    step(store, 0, events[:80])  # redelivered
    step(store, 0, events[40:100])  # overlapping: adds 80..99
    applied, rows = store.pending(0)
    assert applied == 99
    assert rows == [f"row {o}".encode() for o in range(100)]
    store.flushed(0, 59)
    assert store.pending(0) == (99, [f"row {o}".encode() for o in range(60, 100)])
    asked = [e["event_id"] for _, e in events]
    assert store.seen({0: asked}) == {0: (99, {i: o for o, i in enumerate(asked[:100])})}
    assert store.seen({0: []}) == {}
    # a read looks the identities up with the states, in the same script: more of them than
    # one ZMSCORE chunk (1,000) of its Lua, among as many block fields
    many = [*asked, *(f"absent-{i}" for i in range(2_500))]
    keys = every_key([e for _, e in events])
    read = store.read(keys, [0], {}, identities={0: many})
    assert read.seen == {0: (99, {i: o for o, i in enumerate(asked[:100])})}
    assert read.coverage == {0: 99} and read.states == increments_of([e for _, e in events[:100]])
    whole = store.read(keys, [0], {}, whole=True, identities={0: asked[95:]})
    assert whole.seen == {0: (99, {i: o + 95 for o, i in enumerate(asked[95:100])})}
    assert whole.states == read.states


def test_a_floored_cut_remembers_the_identities_it_passes_over(store: RedisOnlineStore) -> None:
    asked: list[int] = []

    def remember(previous: int) -> list[tuple[str, int]]:
        asked.append(previous)
        return [(f"e{o}", 1000 + o) for o in range(previous + 1, 21)]

    store.cut(3, floor=20, remember=remember)
    store.cut(3, floor=20, remember=remember)  # nothing new passed over: not asked again
    assert asked == [-1]
    assert store.seen({3: ["e0", "e20", "e21"]}) == {3: (1020, {"e0": 1000, "e20": 1020})}


def test_an_unreachable_store_is_a_service_error_without_the_password() -> None:
    port = free_port()
    down = RedisOnlineStore(SPEC, "g", f"redis://:s3cret@127.0.0.1:{port}/0")
    with pytest.raises(ServiceError, match=f"127.0.0.1:{port}") as failure:
        down.ping()
    assert "s3cret" not in str(failure.value)
    assert redis_location("redis://user:pw@host:1/0") == "redis://host:1/0"


def by_block(states: dict[StateKey, list[Any]]) -> dict[BlockKey, dict[int, list[Any]]]:
    """{StateKey: states} grouped as `changes` returns them: per block, every bucket."""
    out: dict[BlockKey, dict[int, list[Any]]] = {}
    for (view, entity, bucket), values in states.items():
        out.setdefault((view, entity, block_of(SPEC.view(view), bucket)), {})[bucket] = values
    return out


def blocks_of(states: dict[StateKey, list[Any]]) -> set[BlockKey]:
    return set(by_block(states))


def test_changes_are_exactly_the_fields_changed_since_an_offset(store: RedisOnlineStore) -> None:
    """Across steps, a cut and an epoch drop: the (view, entity) pairs a step touched above
    the offset asked, each with all its buckets' states over the epochs after the cut (as a
    scan reads them), and nothing else."""
    events = batches(9, 1, 400)[0]
    step(store, 0, events[:100])
    everything = store.changes({0: NOTHING}, {})[0]
    assert everything.applied == 99
    assert everything.blocks == by_block(increments_of([e for _, e in events[:100]]))
    step(store, 0, events[100:150])
    step(store, 0, events[150:160])
    touched = blocks_of(increments_of([e for _, e in events[100:160]]))
    since = store.changes({0: 99}, {})[0]
    assert since.applied == 159 and set(since.blocks) == touched
    # each changed pair with all its buckets, summed over every epoch read (not only the step's)
    whole = by_block(increments_of([e for _, e in events[:160]]))
    assert since.blocks == {pair: whole[pair] for pair in touched}
    assert store.changes({0: 159}, {})[0].blocks == {}
    assert set(store.changes({0: 149}, {})[0].blocks) == \
        blocks_of(increments_of([e for _, e in events[150:160]]))

    cut = store.cut(0)
    assert store.changes({0: 159}, {0: cut.epoch})[0].blocks == {}  # a cut changes no state
    step(store, 0, events[160:250])
    above = by_block(increments_of([e for _, e in events[160:250]]))
    after_cut = store.changes({0: 159}, {0: cut.epoch})[0]
    assert after_cut.applied == 249 and after_cut.blocks == above  # the epochs after the cut only
    # a pair changed before the cut, read over the epochs after it: nothing of it there ({})
    before = store.changes({0: 99}, {0: cut.epoch})[0].blocks
    assert {pair: b for pair, b in before.items() if pair not in above} == \
        dict.fromkeys(touched - set(above), {})
    # the reader's held states ⊕ the changes equal a new scan
    assert by_block(dict(store.scan(0, cut.epoch)[1])) == after_cut.blocks

    second = store.cut(0)
    step(store, 0, events[250:400])
    assert store.drop_epochs(0, cut.epoch) == 1
    # fields last changed at or below the dropped cut are gone from the record, later ones stay
    members: list[tuple[bytes, float]] = store.client.zrange(store._changed(0), 0, -1, withscores=True)  # type: ignore[assignment]
    assert min(score for _, score in members) > cut.offset
    assert len(members) == len(by_block(increments_of([e for _, e in events[160:400]])))
    held = by_block(dict(store.scan(0, second.epoch)[1]))
    assert held == by_block(increments_of([e for _, e in events[250:400]]))
    assert store.changes({0: second.offset}, {0: second.epoch})[0].blocks == held
    store.wipe()
    assert not store.client.exists(store._changed(0))
    assert store.changes({0: NOTHING}, {})[0] == Changes(-1, 1, {})


def test_changes_of_several_partitions_in_one_read_and_after_a_restore(store: RedisOnlineStore) -> None:
    parts = batches(10, 3, 600)
    for p, events in parts.items():
        step(store, p, events[:len(events) // 2])
    half = {p: len(events) // 2 - 1 for p, events in parts.items()}
    for p, events in parts.items():
        step(store, p, events[len(events) // 2:])
    read = store.changes(half, {})
    assert set(read) == set(parts)
    for p, events in parts.items():
        whole = by_block(increments_of([e for _, e in events]))
        touched = blocks_of(increments_of([e for o, e in events if o > half[p]]))
        assert read[p].applied == len(events) - 1
        assert read[p].blocks == {pair: whole[pair] for pair in touched}
    # a restored partition: every pair it holds changed at its applied offset
    restored = RedisOnlineStore(SPEC, store.group + "-restored", store.url)
    restored.wipe()
    increments = increments_of([e for _, e in parts[0]])
    restored.restore(0, epoch=3, applied=len(parts[0]) - 1, increments=increments, seen={})
    assert restored.read(list(increments), [0], {0: 2}, whole=True).states == increments  # its indexes too
    assert restored.changes({0: len(parts[0]) - 2}, {0: 2})[0].blocks == by_block(increments)
    assert restored.changes({0: len(parts[0]) - 1}, {0: 2})[0].blocks == {}
    assert restored.drop_epochs(0, 2) == 2  # no cut recorded before the restored epoch: nothing trimmed
    assert restored.changes({0: len(parts[0]) - 2}, {0: 2})[0].blocks == by_block(increments)
    restored.wipe()
