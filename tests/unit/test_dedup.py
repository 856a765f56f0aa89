"""The dedup rule (`lakehouse.dedup`) against its definition, written out plainly, and its
memory: judged in micro-batches that carry over only the clock and the identities within
the horizon, as the online store keeps them, it gives the same answers."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lakehouse.dedup import NO_CLOCK, Dedup, forgettable_below

Record = tuple[str, int | None]  # (identity, Kafka timestamp ms)

records = st.lists(st.tuples(st.sampled_from("abcde"),
                             st.one_of(st.none(), st.integers(min_value=-1, max_value=60))), max_size=60)
horizons = st.one_of(st.none(), st.integers(min_value=1, max_value=30))


def by_definition(sequence: list[Record], horizon: int | None) -> list[bool]:
    """Whether each record is taken, straight from the module docstring."""
    clock, taken, out = NO_CLOCK, [], []
    for identity, timestamp in sequence:
        mine = clock if timestamp is None or timestamp < 0 else max(clock, timestamp)
        duplicate = any(i == identity and (horizon is None or c >= mine - horizon) for i, c in taken)
        if not duplicate:
            taken.append((identity, mine))
            clock = mine
        out.append(not duplicate)
    return out


@settings(max_examples=400, deadline=None)
@given(records, horizons)
def test_the_rule_is_its_definition(sequence: list[Record], horizon: int | None) -> None:
    rule = Dedup(horizon)
    assert [rule.judge(i, t) is not None for i, t in sequence] == by_definition(sequence, horizon)


@settings(max_examples=400, deadline=None)
@given(records, horizons, st.lists(st.integers(min_value=0, max_value=60), max_size=6))
def test_micro_batches_that_keep_one_horizon_agree(sequence: list[Record], horizon: int | None,
                                                   cuts: list[int]) -> None:
    expected = by_definition(sequence, horizon)
    got: list[bool] = []
    clock, kept = NO_CLOCK, {}
    bounds = sorted({0, len(sequence), *(c for c in cuts if c <= len(sequence))})
    for start, end in zip(bounds, bounds[1:], strict=False):
        batch = sequence[start:end]
        rule = Dedup(horizon, clock=clock, taken={i: kept[i] for i, _ in batch if i in kept})  # what a read returns
        got += [rule.judge(i, t) is not None for i, t in batch]
        kept.update(rule.taken)
        clock = rule.clock
        below = forgettable_below(clock, horizon)
        kept = {i: c for i, c in kept.items() if below is None or c >= below}  # the store forgets
    assert got == expected


def test_a_copy_beyond_the_horizon_is_a_new_event_and_the_clock_never_goes_back() -> None:
    rule = Dedup(10)
    assert rule.judge("a", 100) == 100
    assert rule.judge("a", 110) is None  # 10 ms later: a copy
    assert rule.judge("b", 50) == 100  # an older timestamp gets the partition's clock
    assert rule.judge("a", 111) == 111  # 11 ms after the copy taken: a new event
    assert rule.judge("a", None) is None  # no timestamp: the partition's clock, 111
    rule.forget_expired()
    assert set(rule.taken) == {"a"}  # b (clock 100) lies more than 10 ms behind 111
