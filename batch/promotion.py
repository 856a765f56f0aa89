"""The promotion rule: which alias a newly trained version gets (`decide`)."""

from __future__ import annotations

from dataclasses import dataclass

from lakehouse.registry import CHALLENGER, CHAMPION

__all__ = ["Promotion", "decide"]


@dataclass(frozen=True)
class Promotion:
    alias: str  # CHAMPION or CHALLENGER
    reason: str


def decide(new_score: float, champion_score: float | None, metric: str = "roc_auc") -> Promotion:
    """A new version becomes champion only if it beats the champion's score on the same
    holdout (strictly); with no comparable champion it becomes champion."""
    if champion_score is None:
        return Promotion(CHAMPION, "no comparable champion")
    if new_score > champion_score:
        return Promotion(CHAMPION, f"{metric} {new_score:.4f} beats the champion's {champion_score:.4f}")
    return Promotion(CHALLENGER, f"{metric} {new_score:.4f} does not beat the champion's "
                                 f"{champion_score:.4f}")
