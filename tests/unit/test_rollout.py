"""Traffic split and prediction cache: pure routing logic (the arms here are plain async
functions standing in for the Ray Serve handles the integration test uses)."""

from __future__ import annotations

import asyncio
from typing import Any

from lakehouse.registry import CHALLENGER, CHAMPION
from serving.rollout import PredictionCache, Rollout, share


def arm(version: list[int], calls: list[int]) -> Any:
    async def score(rows: list[list[float]]) -> dict[str, Any]:
        calls.append(len(rows))
        return {"scores": [sum(r) / 100 + version[0] for r in rows], "model_version": version[0]}
    return score


def test_split_follows_the_weight_and_sticks_per_entity() -> None:
    rollout = Rollout({CHAMPION: arm([1], []), CHALLENGER: arm([2], [])}, 0.25, PredictionCache(0))
    chosen = [rollout.alias_for(f"user-{i}") for i in range(20_000)]
    assert 0.24 < chosen.count(CHALLENGER) / len(chosen) < 0.26
    assert chosen == [rollout.alias_for(f"user-{i}") for i in range(20_000)]
    assert all(0 <= share(f"u{i}") < 1 for i in range(100))


def test_without_a_challenger_everything_goes_to_the_champion() -> None:
    rollout = Rollout({CHAMPION: arm([1], [])}, 0.5, PredictionCache(0))
    assert {rollout.alias_for(f"user-{i}") for i in range(1000)} == {CHAMPION}


def test_cache_hits_are_exact_and_a_new_version_is_not_served_from_it() -> None:
    version, calls = [1], []
    rollout = Rollout({CHAMPION: arm(version, calls)}, 0.0, PredictionCache(100))
    first = asyncio.run(rollout.score(CHAMPION, [[1.0, 2.0], [3.0, 4.0]]))
    again = asyncio.run(rollout.score(CHAMPION, [[1.0, 2.0], [5.0, 6.0]]))
    assert first.cached == [False, False] and again.cached == [True, False]
    assert again.scores[0] == first.scores[0] and calls == [2, 1]
    version[0] = 2  # a promotion: the next answer comes from version 2
    promoted = asyncio.run(rollout.score(CHAMPION, [[1.0, 2.0], [7.0, 8.0]]))
    assert promoted.version == 2 and promoted.cached == [False, False]
    assert promoted.scores[0] == 0.03 + 2
    assert rollout.cache.hit_rate == 1 / 4  # the hit a promotion discarded is no hit


def test_cache_evicts_the_least_recent() -> None:
    cache = PredictionCache(2)
    cache.put(1, [1.0], 0.1)
    cache.put(1, [2.0], 0.2)
    assert cache.get(1, [1.0]) == 0.1
    cache.put(1, [3.0], 0.3)
    assert cache.get(1, [2.0]) is None and cache.get(1, [1.0]) == 0.1 and cache.get(2, [1.0]) is None
