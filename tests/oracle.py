"""The test oracle: what every "equals a recomputation" test compares the platform with.

States come from `lakehouse.recompute` (plain dicts from the views' declared aggregations,
never the monoids' fold; the exact-merge check uses the same module). The fraud example's
model inputs are written out here by hand from their declared meaning in `lakehouse.fraud`,
without `PlatformSpec.features` or `ModelInput.derive`, so a bug in the spec's fold or in a
derivation shows up as a difference. They use the same float operations in the same order as
the spec (exact integer states, one division), so equal inputs give bit-equal floats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lakehouse.fraud import RISKY_CATEGORIES
from lakehouse.recompute import (
    States,
    Table,
    bucket_start,
    empty_states,
    kafka_arrival,
    point_in_time_states,
    states_by_view,
    view_states,
    window_states,
)

__all__ = [
    "States",
    "Table",
    "bucket_start",
    "empty_states",
    "fraud_features",
    "fraud_model_inputs",
    "kafka_arrival",
    "point_in_time_states",
    "states_by_view",
    "view_states",
    "window_states",
]


def _mean_amount(profile: Mapping[str, Any]) -> float:
    """Mean amount in cents of an amount profile; 0.0 over no events."""
    return profile["amount_sum"] / profile["count"] if profile["count"] else 0.0


def _std_amount(profile: Mapping[str, Any]) -> float:
    """Population standard deviation in cents, from the exact integer sums; 0.0 under two events."""
    n = profile["count"]
    if n < 2:
        return 0.0
    return math.sqrt(max(n * profile["amount_sum_sq"] - profile["amount_sum"] ** 2, 0) / (n * n))


def fraud_model_inputs(states: Mapping[str, Mapping[str, Any]], event: Mapping[str, Any]) -> dict[str, float]:
    """The fraud model's inputs of one event, by name, in the spec's declared order, from the
    states of the events before it (`states[view][aggregation]`) and its own fields."""
    user_10m, user_24h = states["user_10m"], states["user_24h"]
    user, merchant = states["user_all"], states["merchant_all"]
    amount = event["amount"]  # cents
    std = _std_amount(user)
    zscore = (amount - _mean_amount(user)) / std if user["count"] >= 2 and std > 0 else 0.0
    largest = user["amount_max"]
    return {
        "log_amount": math.log1p(amount / 100),
        "user_count_10m": float(user_10m["count"]),
        "user_log_amount_10m": math.log1p(user_10m["amount_sum"] / 100),
        "user_count_24h": float(user_24h["count"]),
        "user_log_count_all": math.log1p(user["count"]),
        "user_amount_zscore": zscore,
        "user_log_ratio_to_max": math.log(amount / largest) if largest else 0.0,
        "merchant_log_count_all": math.log1p(merchant["count"]),
        "merchant_log_mean_amount": math.log1p(_mean_amount(merchant) / 100),
        "risky_category": float(event["merchant_category"] in RISKY_CATEGORIES),
        "online": float(event["channel"] == "online"),
    }


def fraud_features(states: Mapping[str, Mapping[str, Any]], event: Mapping[str, Any]) -> list[float]:
    """`fraud_model_inputs` as a vector, in the declared order."""
    return list(fraud_model_inputs(states, event).values())
