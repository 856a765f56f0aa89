"""The shipped example: card-transaction fraud scoring.

Transactions stream into topic `events` keyed by `user_id`; chargeback labels arrive later
on topic `labels` (one per transaction, `is_fraud` true or false, with the time the label
became known). Features are per-user velocity and amount statistics and per-merchant
statistics, each declared once as monoid aggregations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lakehouse.monoids import Count, Max, Sum, SumOfSquares
from lakehouse.spec import FeatureView, FieldSpec, ModelInput, PlatformSpec, RecordSchema

MINUTE_MS = 60_000

CURRENCIES = ("EUR", "USD", "GBP")
CHANNELS = ("pos", "online", "atm")
COUNTRIES = ("DE", "FR", "GB", "US", "NL", "ES", "IT", "PL", "SE", "BR")
MERCHANT_CATEGORIES = (
    "grocery", "fuel", "restaurant", "apparel", "travel", "electronics",
    "gift_cards", "crypto", "gaming", "pharmacy",
)
RISKY_CATEGORIES = ("gift_cards", "crypto", "electronics")
MAX_AMOUNT = 25_000.00

TRANSACTIONS = RecordSchema(
    name="transaction",
    topic="events",
    key_field="user_id",
    id_field="event_id",
    time_field="event_time",
    fields=(
        FieldSpec("event_id", "string", max_length=64, description="Unique id of the transaction."),
        FieldSpec("user_id", "string", max_length=32, description="Card holder; the Kafka key."),
        FieldSpec("merchant_id", "string", max_length=32),
        FieldSpec("merchant_category", "string", allowed=MERCHANT_CATEGORIES),
        FieldSpec("amount", "money", minimum=0.01, maximum=MAX_AMOUNT,
                  description="Transaction amount, at most two decimals."),
        FieldSpec("currency", "string", allowed=CURRENCIES),
        FieldSpec("country", "string", allowed=COUNTRIES),
        FieldSpec("channel", "string", allowed=CHANNELS),
        FieldSpec("event_time", "timestamp", description="When the card was used (UTC)."),
    ),
    # a producer's retry or a replayed batch resends within minutes; the online store's seen
    # set then holds five minutes of events (about 75 MB at 2,000 events/s, of the local
    # store's 256 MB: tests/benchmarks/online_store.py measures it)
    dedup_horizon_ms=5 * 60_000,
)

CHARGEBACK_LABELS = RecordSchema(
    name="chargeback_label",
    topic="labels",
    key_field="user_id",
    id_field="event_id",
    time_field="label_time",
    fields=(
        FieldSpec("event_id", "string", max_length=64, description="The labelled transaction."),
        FieldSpec("user_id", "string", max_length=32),
        FieldSpec("is_fraud", "boolean"),
        FieldSpec("label_time", "timestamp", description="When the label became known (UTC)."),
    ),
    dedup_horizon_ms=86_400_000,  # a label resent within a day is the same label
)


def _amount_stats() -> dict[str, Any]:
    return {"count": Count(), "amount_sum": Sum("amount"), "amount_sum_sq": SumOfSquares("amount")}


USER_10M = FeatureView(
    name="user_10m",
    entity="user_id",
    aggregations={"count": Count(), "amount_sum": Sum("amount")},
    bucket_ms=MINUTE_MS,
    window_buckets=10,
    description="Per-user velocity: transactions in the last 10 one-minute buckets.",
)
USER_24H = FeatureView(
    name="user_24h",
    entity="user_id",
    aggregations={"count": Count(), "amount_sum": Sum("amount")},
    bucket_ms=60 * MINUTE_MS,
    window_buckets=24,
    description="Per-user activity over the last 24 one-hour buckets.",
)
USER_ALL = FeatureView(
    name="user_all",
    entity="user_id",
    aggregations={**_amount_stats(), "amount_max": Max("amount")},
    description="Per-user amount profile over all history.",
)
MERCHANT_ALL = FeatureView(
    name="merchant_all",
    entity="merchant_id",
    aggregations=_amount_stats(),
    description="Per-merchant amount profile over all history.",
)

States = Mapping[str, Mapping[str, Any]]


def _mean(state: Mapping[str, Any]) -> float:
    count = state["count"]
    return state["amount_sum"] / count if count else 0.0


def _std(state: Mapping[str, Any]) -> float:
    count = state["count"]
    if count < 2:
        return 0.0
    # exact integer arithmetic first, one float operation last
    variance_num = count * state["amount_sum_sq"] - state["amount_sum"] ** 2
    return math.sqrt(max(variance_num, 0) / (count * count))


def _amount_zscore(states: States, event: Mapping[str, Any]) -> float:
    profile = states["user_all"]
    if profile["count"] < 2:
        return 0.0
    std = _std(profile)
    return (event["amount"] - _mean(profile)) / std if std > 0 else 0.0


def _amount_ratio_to_max(states: States, event: Mapping[str, Any]) -> float:
    largest = states["user_all"]["amount_max"]
    return math.log(event["amount"] / largest) if largest else 0.0


MODEL_INPUTS = (
    ModelInput("log_amount", lambda s, e: math.log1p(e["amount"] / 100),
               "log(1 + amount in currency units)"),
    ModelInput("user_count_10m", lambda s, e: float(s["user_10m"]["count"])),
    ModelInput("user_log_amount_10m", lambda s, e: math.log1p(s["user_10m"]["amount_sum"] / 100)),
    ModelInput("user_count_24h", lambda s, e: float(s["user_24h"]["count"])),
    ModelInput("user_log_count_all", lambda s, e: math.log1p(s["user_all"]["count"])),
    ModelInput("user_amount_zscore", _amount_zscore,
               "(amount - user's mean) / user's std, over the user's earlier transactions"),
    ModelInput("user_log_ratio_to_max", _amount_ratio_to_max),
    ModelInput("merchant_log_count_all", lambda s, e: math.log1p(s["merchant_all"]["count"])),
    ModelInput("merchant_log_mean_amount", lambda s, e: math.log1p(_mean(s["merchant_all"]) / 100)),
    ModelInput("risky_category", lambda s, e: float(e["merchant_category"] in RISKY_CATEGORIES)),
    ModelInput("online", lambda s, e: float(e["channel"] == "online")),
)

FRAUD_SPEC = PlatformSpec(
    name="fraud",
    events=TRANSACTIONS,
    labels=CHARGEBACK_LABELS,
    label_field="is_fraud",
    views=(USER_10M, USER_24H, USER_ALL, MERCHANT_ALL),
    model_inputs=MODEL_INPUTS,
    dlq_topic="events.dlq",
)
