"""Which model scores a request, and recent answers kept.

`Rollout` splits /predict traffic between the registry's `champion` (Serve app `model`, the
speed layer's) and `challenger` (app `model-challenger`) by a weight, sticky per entity: an
entity's share is a hash of its id, so one card holder always meets the same model while the
weights stay. Without a challenger app every request goes to the champion.

`PredictionCache` keeps recent scores keyed by (model version, feature vector): the same
inputs to the same version give the same score, so a hit is exact. The version an alias
serves is learnt from its answers; after a promotion the first answer of the new version
moves the key on.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from lakehouse.registry import CHALLENGER, CHAMPION
from lakehouse.serve import AsyncScoreCall

ScoreCall = AsyncScoreCall  # rows → {"scores": [...], "model_version": n}


def share(entity: str) -> float:
    """A stable number in [0, 1) per entity id (the same in every process)."""
    digest = hashlib.sha256(entity.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class PredictionCache:
    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[int, tuple[float, ...]], float] = OrderedDict()
        self.hits = 0
        self.lookups = 0

    def get(self, version: int | None, vector: list[float]) -> float | None:
        if self.size == 0 or version is None:
            return None
        self.lookups += 1
        key = (version, tuple(vector))
        score = self._entries.get(key)
        if score is not None:
            self.hits += 1
            self._entries.move_to_end(key)
        return score

    def put(self, version: int, vector: list[float], score: float) -> None:
        if self.size == 0:
            return
        self._entries[(version, tuple(vector))] = score
        self._entries.move_to_end((version, tuple(vector)))
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


@dataclass(frozen=True)
class Scored:
    scores: list[float]
    version: int
    alias: str
    cached: list[bool]


class Rollout:
    def __init__(self, arms: dict[str, ScoreCall], challenger_weight: float, cache: PredictionCache) -> None:
        if CHAMPION not in arms:
            raise ValueError("a rollout needs the champion")
        self.arms = arms
        self.challenger_weight = challenger_weight if CHALLENGER in arms else 0.0
        self.cache = cache
        self.versions: dict[str, int] = {}  # alias → version its last answer came from

    def alias_for(self, entity: str) -> str:
        return CHALLENGER if share(entity) < self.challenger_weight else CHAMPION

    async def score(self, alias: str, vectors: list[list[float]]) -> Scored:
        """Scores of feature vectors by one alias, from the cache where it holds them."""
        known = self.versions.get(alias)
        scores: list[float | None] = [self.cache.get(known, v) for v in vectors]
        missing = [i for i, s in enumerate(scores) if s is None]
        version = known
        if missing:
            answer = await self.arms[alias]([vectors[i] for i in missing])
            version = int(answer["model_version"])
            if version != known and len(missing) < len(vectors):
                # the hits were the old version's: one version answers the whole request
                self.cache.hits -= len(vectors) - len(missing)
                missing = list(range(len(vectors)))
                answer = await self.arms[alias](vectors)
                version = int(answer["model_version"])
            self.versions[alias] = version
            for i, score in zip(missing, answer["scores"], strict=True):
                scores[i] = float(score)
                self.cache.put(version, vectors[i], float(score))
        assert version is not None
        return Scored([float(s) for s in scores if s is not None], version, alias,
                      [i not in missing for i in range(len(vectors))])
