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

import functools
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from lakehouse.errors import SpecError, ValidationError
from lakehouse.fastparse import FastPath, compile_fast_path
from lakehouse.monoids import Aggregation
from lakehouse.safejson import JsonLimits, JsonRefused, decode

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)

FieldType = Literal["string", "long", "double", "money", "boolean", "timestamp"]
DedupScope = Literal["entity"]

_INT64 = (-(2**63), 2**63 - 1)
_DAY_MS = 86_400_000
_MAX_NAME = 64  # field names quoted in reasons are cut to this many characters
_MAX_UNKNOWN_REASONS = 8


class _Unchecked:
    def __repr__(self) -> str:
        return "UNCHECKED"


UNCHECKED: Any = _Unchecked()  # `inspect(key=UNCHECKED)`: the record has no Kafka key to check


@dataclass(frozen=True)
class RecordLimits:
    """What one message may be, beyond its fields' rules; each violation has its own reason.

    `json` bounds the document (size, nesting, number length: see `lakehouse.safejson`).
    A record's time field may lie at most `max_future_skew_ms` after the record's arrival
    (its Kafka timestamp; the server's clock for /predict) and, when `max_past_skew_ms` is
    set, at most that long before it: outside, `out_of_range_time:<field>`. No lower bound
    by default: replays and late events are legitimate, and the shipped generator simulates
    times in the past of the wall clock.
    """

    json: JsonLimits = JsonLimits()
    max_future_skew_ms: int = _DAY_MS
    max_past_skew_ms: int | None = None


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
    limits: RecordLimits = RecordLimits()
    # Deduplication: an event id is unique within its key entity (the Kafka key), which a
    # partitioned speed layer can enforce exactly, each member seeing every event of the
    # entities it owns; a global scope would need a shared id index, so none is offered.
    dedup_scope: DedupScope = "entity"
    # A later copy is a duplicate while it arrives within this many milliseconds (Kafka time)
    # of the copy taken (`lakehouse.dedup`); None: forever, which costs every layer memory
    # or reads that grow with the topic's history.
    dedup_horizon_ms: int | None = None

    def __post_init__(self) -> None:
        if self.dedup_horizon_ms is not None and self.dedup_horizon_ms <= 0:
            raise SpecError(f"schema {self.name}: dedup_horizon_ms must be positive (or None: "
                            f"forever), not {self.dedup_horizon_ms}")
        names = {f.name for f in self.fields}
        for required in (self.key_field, self.id_field, self.time_field):
            if required not in names:
                raise SpecError(f"schema {self.name}: {required!r} is not one of its fields")

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def dedup_key(self, record: Mapping[str, Any]) -> tuple[Any, Any]:
        """What two records share when one is a duplicate of the other (`dedup_scope`)."""
        return record[self.key_field], record[self.id_field]

    def parse(self, raw: bytes | str | None, *, key: bytes | str | None = UNCHECKED,
              arrival_ms: int | None = None) -> dict[str, Any]:
        """Decode and validate one message value; return the typed record.

        Typed values: money → int cents, timestamp → int epoch ms (UTC), long → int,
        double → float. Raises ValidationError, and nothing else whatever the bytes, whose
        `reasons` name every failed rule as `<rule>:<field>`. Rules of the document:
        missing_value (a tombstone), too_large, invalid_utf8, too_deep, number_too_long,
        malformed_json, duplicate_key, not_an_object; of its fields: missing, unknown_field,
        wrong_type, out_of_range, not_allowed, too_long, bad_timestamp, bad_money,
        invalid_string, unrepresentable (beyond a 64-bit integer); of its envelope: missing_key
        and key_mismatch (when `key`, the Kafka key, is given: it must equal the `key_field`
        value), out_of_range_time (when `arrival_ms` is given, see `RecordLimits`).
        Answered as `inspect` answers: by the compiled fast path or by `inspect_slow`.
        """
        values = self._fast_path(raw, key, arrival_ms)
        if values is not None:
            return values
        inspection = self.inspect_slow(raw, key=key, arrival_ms=arrival_ms)
        if inspection.reasons:
            raise ValidationError(inspection.reasons)
        return inspection.values

    def inspect(self, raw: bytes | str | None, *, key: bytes | str | None = UNCHECKED,
                arrival_ms: int | None = None) -> Inspection:
        """Validate without raising: every reason, and each field's value as far as it could
        be read (an out-of-range number or a disallowed string is kept; a missing or
        unreadable one is None). Data-quality reports (Great Expectations) see these values;
        `parse` is this with the reasons turned into an error. Never raises.

        A record the compiled fast path (`lakehouse.fastparse`, generated from these fields)
        accepts is answered by it; everything else by `inspect_slow`, the reference, which
        the fast path agrees with (tests/unit/test_fast_validator.py)."""
        values = self._fast_path(raw, key, arrival_ms)
        if values is not None:
            return Inspection(True, values, 0, [], True)
        return self.inspect_slow(raw, key=key, arrival_ms=arrival_ms)

    @functools.cached_property
    def _fast_path(self) -> FastPath:
        """The fast path compiled for this schema, once per instance (not pickled: see
        `__getstate__`)."""
        return compile_fast_path(
            self.fields, key_field=self.key_field, time_field=self.time_field,
            max_bytes=self.limits.json.max_bytes, max_number_length=self.limits.json.max_number_length,
            max_future_skew_ms=self.limits.max_future_skew_ms,
            max_past_skew_ms=self.limits.max_past_skew_ms, unchecked=UNCHECKED)

    def __getstate__(self) -> dict[str, Any]:
        """The schema without its compiled fast path (generated code does not pickle; a copy
        compiles its own on first use): Spark ships schemas to its executors."""
        state = dict(self.__dict__)
        state.pop("_fast_path", None)
        return state

    def inspect_slow(self, raw: bytes | str | None, *, key: bytes | str | None = UNCHECKED,
                     arrival_ms: int | None = None) -> Inspection:
        """The reference validation routine, rule by rule in Python: what `inspect` answers
        for every input, whether its fast path or this answers it. Never raises."""
        try:
            document = decode(raw, self.limits.json)
        except JsonRefused as refused:
            if refused.rule == "malformed_json":
                return Inspection(False, {}, 0, [f"malformed_json: {refused.detail}"])
            if refused.rule == "duplicate_key":
                return Inspection(False, {}, 0, [f"duplicate_key:{_quoted(refused.detail)}"])
            return Inspection(False, {}, 0, [refused.rule])
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
            except (ArithmeticError, ValueError):  # a number too large for any arithmetic
                reasons.append(f"unrepresentable:{spec.name}")
                values[spec.name] = None
        unknown = sorted(set(document) - set(self.field_names))
        reasons.extend(f"unknown_field:{_quoted(name)}" for name in unknown[:_MAX_UNKNOWN_REASONS])
        if len(unknown) > _MAX_UNKNOWN_REASONS:
            reasons.append(f"unknown_field:+{len(unknown) - _MAX_UNKNOWN_REASONS} more")
        envelope_ok = True
        if key is not UNCHECKED:
            problem = self._key_problem(key, values.get(self.key_field))
            if problem:
                reasons.append(f"{problem}:{self.key_field}")
                envelope_ok = False
        if arrival_ms is not None and self._time_out_of_range(values.get(self.time_field), arrival_ms):
            reasons.append(f"out_of_range_time:{self.time_field}")
            envelope_ok = False
        return Inspection(True, values, len(unknown), reasons, envelope_ok)

    def _key_problem(self, key: bytes | str | None, value: Any) -> str | None:
        """missing_key or key_mismatch, or None when the Kafka key equals the key field
        (UTF-8 text of it). A record whose key field is itself unreadable is refused for
        that already."""
        if key is None or len(key) == 0:
            return "missing_key"
        if not isinstance(value, str):
            return None
        if isinstance(key, bytes | bytearray | memoryview):
            try:
                key = bytes(key).decode("utf-8")
            except UnicodeDecodeError:
                return "key_mismatch"
        return None if key == value else "key_mismatch"

    def _time_out_of_range(self, time_ms: Any, arrival_ms: int) -> bool:
        if not isinstance(time_ms, int):
            return False  # unreadable times are refused by their field's rule
        limits = self.limits
        if time_ms - arrival_ms > limits.max_future_skew_ms:
            return True
        return limits.max_past_skew_ms is not None and arrival_ms - time_ms > limits.max_past_skew_ms


def _quoted(name: str) -> str:
    """A name from the document, as a reason quotes it: printable, at most 64 characters."""
    shown = name if name.isprintable() else name.encode("unicode_escape", "backslashreplace").decode("ascii")
    return shown if len(shown) <= _MAX_NAME else shown[:_MAX_NAME] + "…"


@dataclass(frozen=True)
class Inspection:
    """What `RecordSchema.inspect` found in one message."""

    is_object: bool
    values: dict[str, Any]
    unknown_fields: int
    reasons: list[str]
    envelope_ok: bool = True  # the Kafka key and timestamp agree with the record


class _Rejected(Exception):
    def __init__(self, rule: str, observed: Any = None) -> None:
        self.rule = rule
        self.observed = observed  # the value as far as it could be read, for reports


def _check_value(spec: FieldSpec, value: Any) -> Any:
    if spec.type == "string":
        if not isinstance(value, str):
            raise _Rejected("wrong_type")
        if not _utf8_encodable(value):
            raise _Rejected("invalid_string")  # a lone surrogate (JSON "\ud800"): no UTF-8 form
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
        cents = money_to_cents(value)
        if not _INT64[0] <= cents <= _INT64[1]:
            raise _Rejected("unrepresentable")  # the tables hold cents as 64-bit integers
        return cents
    if spec.type == "double":
        return float(value)
    if not _INT64[0] <= value <= _INT64[1]:
        raise _Rejected("unrepresentable")  # beyond a 64-bit integer column
    return value


def _utf8_encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _observed_number(spec: FieldSpec, value: int | float) -> int | float:
    """An out-of-range number in its typed unit (cents for money), for reports, clamped to
    what the column (a 64-bit integer or a double) holds: still outside the bounds."""
    if spec.type == "double":
        return max(min(value, 1.7976931348623157e308), -1.7976931348623157e308)
    try:
        observed = round(value * 100) if spec.type == "money" else value
    except OverflowError:  # value * 100 is an infinity
        observed = _INT64[1] if value > 0 else _INT64[0]
    return max(min(observed, _INT64[1]), _INT64[0])


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
        if moment.tzinfo is None:
            raise _Rejected("bad_timestamp")
        return (moment - _EPOCH) // _ONE_MS
    except (ValueError, OverflowError):  # OverflowError: e.g. year 1 with a positive offset
        raise _Rejected("bad_timestamp") from None


def format_timestamp_ms(epoch_ms: int) -> str:
    """The wire form of a timestamp: ISO-8601 UTC with milliseconds and a Z."""
    moment = datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)
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
            if schema.dedup_horizon_ms is not None:
                described.append(["dedup_horizon_ms", schema.dedup_horizon_ms])
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
