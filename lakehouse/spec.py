"""The platform spec: what flows through lambdalake, declared once.

A `PlatformSpec` holds the event and label schemas (topics and validation rules), the
feature views (monoid aggregations per entity, optionally over time buckets) and the model
inputs. Every layer reads its behaviour from here: the batch layer derives its Great
Expectations suite and Spark aggregations, the speed layer validates and aggregates events
with the same rules, the serving layer merges the same states. The shipped example lives in
`lakehouse/fraud.py`.

Data contracts:
- timestamps travel as ISO-8601 strings in UTC (`2026-01-01T00:00:00.000Z`) and are parsed
  to integer epoch milliseconds;
- money travels as a JSON number with at most two decimals and is parsed to integer cents;
- each Kafka message is keyed by the event's `key_field`, so one entity's events stay ordered
  within a partition.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Literal

from lakehouse.errors import SpecError, ValidationError
from lakehouse.monoids import Aggregation

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_MS = timedelta(milliseconds=1)

FieldType = Literal["string", "long", "double", "money", "boolean", "timestamp"]


@dataclass(frozen=True)
class FieldSpec:
    """One field of a JSON record and the rules a valid value satisfies."""

    name: str
    type: FieldType
    required: bool = True
    minimum: float | None = None
    maximum: float | None = None
    allowed: tuple[str, ...] | None = None
    max_length: int | None = None
    description: str = ""


@dataclass(frozen=True)
class RecordSchema:
    """A JSON record on a Kafka topic. `parse` is the single validation routine."""

    name: str
    topic: str
    key_field: str
    id_field: str
    time_field: str
    fields: tuple[FieldSpec, ...]

    def __post_init__(self) -> None:
        names = {f.name for f in self.fields}
        for required in (self.key_field, self.id_field, self.time_field):
            if required not in names:
                raise SpecError(f"schema {self.name}: {required!r} is not one of its fields")

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def parse(self, raw: bytes | str) -> dict[str, Any]:
        """Decode and validate one message value; return the typed record.

        Typed values: money → int cents, timestamp → int epoch ms (UTC), long → int,
        double → float. Raises ValidationError whose `reasons` name every failed rule as
        `<rule>:<field>` (rules: malformed_json, not_an_object, missing, unknown_field,
        wrong_type, out_of_range, not_allowed, too_long, bad_timestamp, bad_money).
        """
        inspection = self.inspect(raw)
        if inspection.reasons:
            raise ValidationError(inspection.reasons)
        return inspection.values

    def inspect(self, raw: bytes | str) -> Inspection:
        """Validate without raising: every reason, and each field's value as far as it could
        be read (an out-of-range number or a disallowed string is kept; a missing or
        unreadable one is None). Data-quality reports (Great Expectations) see these values;
        `parse` is this with the reasons turned into an error."""
        try:
            document = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return Inspection(False, {}, 0, [f"malformed_json: {exc.__class__.__name__}"])
        if not isinstance(document, dict):
            return Inspection(False, {}, 0, ["not_an_object"])
        reasons: list[str] = []
        values: dict[str, Any] = {}
        for spec in self.fields:
            value = document.get(spec.name)
            if value is None:
                if spec.required:
                    reasons.append(f"missing:{spec.name}")
                values[spec.name] = None
                continue
            try:
                values[spec.name] = _check_value(spec, value)
            except _Rejected as rejected:
                reasons.append(f"{rejected.rule}:{spec.name}")
                values[spec.name] = rejected.observed
        unknown = sorted(set(document) - set(self.field_names))
        reasons.extend(f"unknown_field:{name}" for name in unknown)
        return Inspection(True, values, len(unknown), reasons)


@dataclass(frozen=True)
class Inspection:
    """What `RecordSchema.inspect` found in one message."""

    is_object: bool
    values: dict[str, Any]
    unknown_fields: int
    reasons: list[str]


class _Rejected(Exception):
    def __init__(self, rule: str, observed: Any = None) -> None:
        self.rule = rule
        self.observed = observed  # the value as far as it could be read, for reports


def _check_value(spec: FieldSpec, value: Any) -> Any:
    if spec.type == "string":
        if not isinstance(value, str):
            raise _Rejected("wrong_type")
        if spec.max_length is not None and len(value) > spec.max_length:
            raise _Rejected("too_long", value)
        if spec.allowed is not None and value not in spec.allowed:
            raise _Rejected("not_allowed", value)
        return value
    if spec.type == "boolean":
        if not isinstance(value, bool):
            raise _Rejected("wrong_type")
        return value
    if spec.type == "timestamp":
        if not isinstance(value, str):
            raise _Rejected("wrong_type")
        return parse_timestamp_ms(value)
    # numbers: bool is an int subclass in Python but never a valid number here
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Rejected("wrong_type")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Rejected("out_of_range")
    if spec.type == "long" and not isinstance(value, int):
        raise _Rejected("wrong_type")
    if (spec.minimum is not None and value < spec.minimum) or (
        spec.maximum is not None and value > spec.maximum
    ):
        raise _Rejected("out_of_range", _observed_number(spec, value))
    if spec.type == "money":
        return money_to_cents(value)
    if spec.type == "double":
        return float(value)
    return value


def _observed_number(spec: FieldSpec, value: int | float) -> int | float:
    """An out-of-range number in its typed unit (cents for money), for reports."""
    if spec.type == "money":
        return round(value * 100)
    return float(value) if spec.type == "double" else value


def money_to_cents(value: int | float) -> int:
    """Exact integer cents of a JSON number with at most two decimals."""
    try:
        cents = Decimal(str(value)) * 100
    except InvalidOperation:
        raise _Rejected("bad_money") from None
    if cents != cents.to_integral_value():
        raise _Rejected("bad_money")
    return int(cents)


def parse_timestamp_ms(text: str) -> int:
    """Epoch milliseconds of an ISO-8601 timestamp that names its UTC offset."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _Rejected("bad_timestamp") from None
    if moment.tzinfo is None:
        raise _Rejected("bad_timestamp")
    return (moment - _EPOCH) // _ONE_MS


def format_timestamp_ms(epoch_ms: int) -> str:
    """The wire form of a timestamp: ISO-8601 UTC with milliseconds and a Z."""
    moment = datetime.fromtimestamp(epoch_ms / 1000, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"


@dataclass(frozen=True)
class FeatureView:
    """Monoid aggregations of events per entity, optionally over a sliding window of buckets.

    Point-in-time semantics (the same in every layer): the features of an event are the
    states of the entity's events that precede it, not the event itself. "Precede" means
    arrival order, what a real-time system can observe: for the entity that keys the Kafka
    messages, earlier offsets in its partition (exact in every layer); for other entities,
    earlier (event time, partition, offset), which the speed layer can only approximate
    (its skew is measured, not assumed). A late event therefore sees everything that
    arrived before it, and is seen by what arrives after it. With `bucket_ms`
    set, only events whose bucket lies in the `window_buckets` buckets ending at the event's
    own bucket count: bucket(e) - window_buckets < bucket(x) <= bucket(e).
    """

    name: str
    entity: str
    aggregations: Mapping[str, Aggregation]
    bucket_ms: int | None = None
    window_buckets: int | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if (self.bucket_ms is None) != (self.window_buckets is None):
            raise SpecError(f"feature view {self.name}: set both bucket_ms and window_buckets")

    @property
    def windowed(self) -> bool:
        return self.bucket_ms is not None

    def bucket_of(self, event_time_ms: int) -> int:
        """Bucket start (epoch ms) of an event time; 0 for views without buckets."""
        if self.bucket_ms is None:
            return 0
        return event_time_ms - event_time_ms % self.bucket_ms

    def window_buckets_of(self, event_time_ms: int) -> range:
        """Bucket starts whose states form an event's windowed features."""
        if self.bucket_ms is None or self.window_buckets is None:
            return range(0, 1)
        last = self.bucket_of(event_time_ms)
        first = last - (self.window_buckets - 1) * self.bucket_ms
        return range(first, last + 1, self.bucket_ms)


Derivation = Callable[[Mapping[str, Mapping[str, Any]], Mapping[str, Any]], float]


@dataclass(frozen=True)
class ModelInput:
    """One numeric model input, derived from view states and the event's own fields.

    `derive(states, event)` gets `states[view_name][aggregation_name]` (monoid sums as of
    just before the event) and the typed event, and returns a float. It must be a pure
    function so that training, speed scoring and /predict agree bit for bit.
    """

    name: str
    derive: Derivation
    description: str = ""


@dataclass(frozen=True)
class PlatformSpec:
    name: str
    events: RecordSchema
    labels: RecordSchema
    label_field: str
    views: tuple[FeatureView, ...]
    model_inputs: tuple[ModelInput, ...]
    dlq_topic: str = field(default="")

    def __post_init__(self) -> None:
        names = [v.name for v in self.views]
        if len(set(names)) != len(names):
            raise SpecError(f"spec {self.name}: duplicate feature view names {names}")
        for view in self.views:
            if view.entity not in self.events.field_names:
                raise SpecError(f"feature view {view.name}: entity {view.entity!r} is no event field")
        if self.label_field not in self.labels.field_names:
            raise SpecError(f"spec {self.name}: label field {self.label_field!r} not in labels")

    @property
    def topics(self) -> tuple[str, ...]:
        return (self.events.topic, self.labels.topic, self.dlq_topic or f"{self.events.topic}.dlq")

    def view(self, name: str) -> FeatureView:
        for candidate in self.views:
            if candidate.name == name:
                return candidate
        raise SpecError(f"no feature view named {name!r}; views: {[v.name for v in self.views]}")

    def features(self, states: Mapping[str, Mapping[str, Any]], event: Mapping[str, Any]) -> list[float]:
        """The model input vector of an event, in `model_inputs` order."""
        return [model_input.derive(states, event) for model_input in self.model_inputs]

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.model_inputs)

    def fingerprint(self) -> str:
        """A stable hash of the declared spec, recorded as lineage with every model."""
        described: list[Any] = [self.name, self.label_field]
        for schema in (self.events, self.labels):
            described.append([schema.topic, schema.key_field, schema.id_field, repr(schema.fields)])
        for view in self.views:
            described.append(
                [view.name, view.entity, view.bucket_ms, view.window_buckets,
                 sorted((k, a.kind, a.field) for k, a in view.aggregations.items())]
            )
        described.append([m.name for m in self.model_inputs])
        return hashlib.sha256(json.dumps(described, default=str).encode()).hexdigest()[:16]


def empty_states(views: Sequence[FeatureView]) -> dict[str, dict[str, Any]]:
    """Monoid identities for every aggregation of every view."""
    return {v.name: {k: a.zero for k, a in v.aggregations.items()} for v in views}
