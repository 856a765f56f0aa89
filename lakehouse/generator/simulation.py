"""The simulation: a synthetic world of users, cards and merchants, and the messages it sends.

`generate(options)` is pure and deterministic: it yields every `Message` in send order, each
carrying its ground truth (see the package docstring, `lakehouse.generator`, for the data
contracts and the fraud model). Nothing here writes a file or talks to Kafka.
"""

from __future__ import annotations

import bisect
import heapq
import json
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import numpy as np

from lakehouse.errors import ConfigError, SpecError
from lakehouse.fraud import (
    CHANNELS,
    CHARGEBACK_LABELS,
    COUNTRIES,
    FRAUD_SPEC,
    MAX_AMOUNT,
    MERCHANT_CATEGORIES,
    RISKY_CATEGORIES,
    TRANSACTIONS,
    USER_10M,
)
from lakehouse.spec import format_timestamp_ms

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DEFAULT_START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00.000Z
# Each user transacts every 2 h on average (busy users more often). The default gap between
# any two transactions is this divided by the number of users, so velocity looks the same
# whatever the number of events, and ~200k events (4,000 users) span about 4 days.
DEFAULT_USER_MEAN_GAP_MS = 2 * 60 * 60_000

EVENTS_TOPIC = TRANSACTIONS.topic
LABELS_TOPIC = CHARGEBACK_LABELS.topic

MALFORMED_KINDS = (
    "malformed_json", "missing", "wrong_type", "out_of_range", "unknown_field",
    "not_allowed", "bad_timestamp",
)
"""Ways a generated message breaks `TRANSACTIONS`, named by the spec's validation rule."""

KIND_VALID = "valid"
KIND_LATE = "late"
KIND_DUPLICATE = "duplicate"
KIND_LABEL = "label"
MALFORMED_PREFIX = "malformed:"

_MAX_CENTS = round(MAX_AMOUNT * 100)
_CURRENCY_OF = {"GB": "GBP", "US": "USD", "BR": "USD"}  # everyone else pays in EUR
# Shapes of the population, by name; a value the spec adds later gets a small default share.
_COUNTRY_WEIGHTS = {"DE": 0.22, "FR": 0.15, "GB": 0.15, "US": 0.12, "NL": 0.07, "ES": 0.08,
                    "IT": 0.08, "PL": 0.06, "SE": 0.04, "BR": 0.03}
_CHANNEL_WEIGHTS = {"pos": 0.62, "online": 0.33, "atm": 0.05}  # users' preferred channel
_CATEGORY_WEIGHTS = {  # share of merchants per category; risky ones are ~15%
    "grocery": 0.20, "fuel": 0.10, "restaurant": 0.20, "apparel": 0.12, "travel": 0.06,
    "electronics": 0.08, "gift_cards": 0.04, "crypto": 0.03, "gaming": 0.07, "pharmacy": 0.10,
}
_CATEGORY_PRICE = {  # legit amount multiplier per category: travel and electronics cost more
    "grocery": 0.8, "fuel": 1.0, "restaurant": 0.9, "apparel": 1.3, "travel": 2.0,
    "electronics": 1.8, "gift_cards": 1.2, "crypto": 1.8, "gaming": 0.7, "pharmacy": 0.6,
}
_DUPLICATE_POOL = 512  # duplicates re-send one of the last this-many valid events
_BLOCK = 16_384  # random numbers drawn from numpy per refill


# ---------------------------------------------------------------------------- p_true


@dataclass(frozen=True)
class FraudModel:
    """The true P(fraud | model inputs): a logistic function of named `fraud.MODEL_INPUTS`.

    logit = intercept
            + velocity * log1p(max(0, user_count_10m - 1))      # a burst in progress
            + amount_jump * clip(user_log_ratio_to_max, 0, 3)   # above anything seen before
            + amount_zscore * clip(user_amount_zscore, 0, 10) / 10
            + risky_category * risky_category + online * online
    One earlier transaction within ten minutes is ordinary; two or more are a burst.
    """

    intercept: float = -9.0
    velocity: float = 4.5
    amount_jump: float = 1.0
    amount_zscore: float = 5.0
    risky_category: float = 1.5
    online: float = 3.0

    inputs: tuple[str, ...] = field(
        default=("user_count_10m", "user_log_ratio_to_max", "user_amount_zscore",
                 "risky_category", "online"),
        init=False,
    )

    def probability(self, features: Mapping[str, float]) -> float:
        """p_true of one transaction from its model inputs, by name (extra names ignored)."""
        logit = (
            self.intercept
            + self.velocity * math.log1p(max(0.0, features["user_count_10m"] - 1.0))
            + self.amount_jump * min(max(features["user_log_ratio_to_max"], 0.0), 3.0)
            + self.amount_zscore * min(max(features["user_amount_zscore"], 0.0), 10.0) / 10.0
            + self.risky_category * features["risky_category"]
            + self.online * features["online"]
        )
        if logit >= 0:  # either form, chosen so that exp never overflows
            return 1.0 / (1.0 + math.exp(-logit))
        odds = math.exp(logit)
        return odds / (1.0 + odds)


TRUE_FRAUD_MODEL = FraudModel()


def fraud_probability(features: Mapping[str, float]) -> float:
    """The ground-truth fraud probability of a transaction given its model inputs by name.

    Later layers can recompute p_true from the features they computed and compare it with
    the truth file: equal values prove their features are the generator's point-in-time ones.
    """
    return TRUE_FRAUD_MODEL.probability(features)


_DERIVE = {m.name: m.derive for m in FRAUD_SPEC.model_inputs}
missing_inputs = set(TRUE_FRAUD_MODEL.inputs) - set(_DERIVE)
if missing_inputs:  # the spec lost an input p_true needs: fail at import, not mid-stream
    raise SpecError(f"the true fraud model needs model inputs {sorted(missing_inputs)}, "
                    "which lakehouse.fraud no longer declares")
del missing_inputs
_TRUE_MODEL_INPUTS = tuple((name, _DERIVE[name]) for name in TRUE_FRAUD_MODEL.inputs)


# ---------------------------------------------------------------------------- options


@dataclass(frozen=True)
class GeneratorOptions:
    """What to simulate. Validated on construction (ConfigError names the option to fix).

    Fractions are shares of the `events` messages (expected values; each message's kind is
    drawn independently): `malformed_fraction` + `duplicate_fraction` + `late_fraction` <= 1.
    `users` defaults to max(100, events // 50) and `merchants` to max(20, users // 5);
    `mean_gap_ms` (between any two transactions) to 2 h / users.
    `burst_probability` is the chance, per transaction, that some card gets compromised and
    starts a burst; `cnp_probability` the chance that a transaction is a lone card-not-present
    fraud instead of a legit purchase. `TRUE_FRAUD_MODEL` is calibrated for the defaults of
    these and of the user activity (~2% fraud, Bayes AUC ~0.98); other values change both.
    """

    events: int
    seed: int = 0
    malformed_fraction: float = 0.005
    duplicate_fraction: float = 0.005
    late_fraction: float = 0.01
    start_ms: int = DEFAULT_START_MS
    mean_gap_ms: float | None = None
    users: int | None = None
    merchants: int | None = None
    late_min_ms: int = 5 * MINUTE_MS
    late_max_ms: int = 6 * HOUR_MS
    label_delay_min_ms: int = HOUR_MS
    label_delay_max_ms: int = 48 * HOUR_MS
    burst_probability: float = 0.0035
    cnp_probability: float = 0.004

    def __post_init__(self) -> None:
        _require_int("events", self.events, 1, 10**10)
        _require_int("seed", self.seed, 0, 2**63 - 1)
        for name in ("malformed_fraction", "duplicate_fraction", "late_fraction",
                     "burst_probability", "cnp_probability"):
            _require_fraction(name, getattr(self, name))
        total = self.malformed_fraction + self.duplicate_fraction + self.late_fraction
        if total > 1.0:
            raise ConfigError(
                f"malformed_fraction + duplicate_fraction + late_fraction must be at most 1 "
                f"(got {total:g}): lower one of them"
            )
        _require_int("start_ms", self.start_ms, 0, 250_000_000_000_000)  # up to year ~9900
        gap = self.mean_gap_ms
        if gap is not None and (isinstance(gap, bool) or not isinstance(gap, int | float) or not (
            math.isfinite(gap) and 0 < gap <= 24 * HOUR_MS
        )):
            raise ConfigError(f"mean_gap_ms must be a number in (0, {24 * HOUR_MS}] (got {gap!r})")
        if self.users is not None:
            _require_int("users", self.users, 1, 10**8)
        if self.merchants is not None:
            _require_int("merchants", self.merchants, 1, 10**8)
        for low, high in (("late_min_ms", "late_max_ms"),
                          ("label_delay_min_ms", "label_delay_max_ms")):
            _require_int(low, getattr(self, low), 1, 365 * 24 * HOUR_MS)
            _require_int(high, getattr(self, high), 1, 365 * 24 * HOUR_MS)
            if getattr(self, low) > getattr(self, high):
                raise ConfigError(f"{low} must not exceed {high} "
                                  f"(got {getattr(self, low)} > {getattr(self, high)})")

    @property
    def n_users(self) -> int:
        return self.users if self.users is not None else max(100, self.events // 50)

    @property
    def n_merchants(self) -> int:
        return self.merchants if self.merchants is not None else max(20, self.n_users // 5)

    @property
    def gap_ms(self) -> float:
        """Mean simulated time between two consecutive transactions (any users)."""
        if self.mean_gap_ms is not None:
            return float(self.mean_gap_ms)
        return DEFAULT_USER_MEAN_GAP_MS / self.n_users


def _require_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer in [{low}, {high}] (got {value!r})")


def _require_fraction(name: str, value: object) -> None:
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not (math.isfinite(value) and 0.0 <= value <= 1.0)):
        raise ConfigError(f"{name} must be a number in [0, 1] (got {value!r})")


# ---------------------------------------------------------------------------- messages


class Message(NamedTuple):
    """One Kafka message and its ground truth (see the module docstring for the contract)."""

    topic: str
    key: bytes
    value: bytes
    kind: str
    seq: int
    sent_ms: int
    event_id: str | None
    user_id: str
    event_time_ms: int
    label_time_ms: int | None
    p_true: float
    is_fraud: bool | None
    compromised: bool


# A message not yet sent: Message's fields without seq and sent_ms, which sending assigns.
_Pending = tuple[str, bytes, bytes, str, str | None, str, int, int | None, float, bool | None, bool]

_EVENT_JSON = (
    '{"event_id":"%s","user_id":"%s","merchant_id":"%s","merchant_category":"%s",'
    '"amount":%d.%02d,"currency":"%s","country":"%s","channel":"%s","event_time":"%s"}'
)
_LABEL_JSON = '{"event_id":"%s","user_id":"%s","is_fraud":%s,"label_time":"%s"}'


class _Randoms:
    """Uniform and standard-normal draws from one seeded numpy Generator, fetched in blocks
    and handed out by `next` on a generator (per-scalar numpy calls, or even a Python
    method per draw, would cost more than the rest of a transaction)."""

    def __init__(self, rng: np.random.Generator) -> None:
        def blocks(draw: Callable[[int], np.ndarray]) -> Iterator[float]:
            while True:
                yield from draw(_BLOCK).tolist()

        self.uniform: Callable[[], float] = partial(next, blocks(rng.random))
        self.normal: Callable[[], float] = partial(next, blocks(rng.standard_normal))

    def index(self, n: int) -> int:
        return min(int(self.uniform() * n), n - 1)

    def between(self, low: float, high: float) -> float:
        return low + (high - low) * self.uniform()

    def log_between(self, low: float, high: float) -> float:
        """Log-uniform in [low, high]: as many 2-4x as 10-20x multipliers."""
        return low * math.exp(math.log(high / low) * self.uniform())


class _Timestamps:
    """`spec.format_timestamp_ms`, memoised per minute: the text up to the minute comes
    from the spec's function, seconds and milliseconds are appended (same bytes, ~10x
    faster; the generator formats two timestamps per transaction)."""

    def __init__(self) -> None:
        self._minutes: dict[int, str] = {}

    def format(self, epoch_ms: int) -> str:
        minute, in_minute = divmod(epoch_ms, MINUTE_MS)
        prefix = self._minutes.get(minute)
        if prefix is None:
            if len(self._minutes) >= 8_192:  # labels spread over 48 h: keep ~3 days of them
                self._minutes.clear()
            prefix = self._minutes[minute] = format_timestamp_ms(minute * MINUTE_MS)[:17]
        return f"{prefix}{in_minute // 1000:02d}.{in_minute % 1000:03d}Z"


class _DueQueue:
    """A priority queue of (due_ms, tie, ...) entries, popped in (due_ms, tie) order.

    A calendar queue: entries due in a later minute wait unsorted in that minute's list and
    join the heap only when the clock reaches their minute, so the heap stays as small as
    one minute's worth although ~12% of all labels are pending at once (a heap of all of
    them costs twice as much per push and pop at 10M events).
    """

    def __init__(self, now_ms: int) -> None:
        self._heap: list[tuple[Any, ...]] = []
        self._later: dict[int, list[tuple[Any, ...]]] = {}
        self._minute = now_ms // MINUTE_MS  # entries due up to the end of it are in the heap

    def __len__(self) -> int:
        return len(self._heap) + sum(map(len, self._later.values()))

    def push(self, entry: tuple[Any, ...]) -> None:
        minute = entry[0] // MINUTE_MS
        if minute <= self._minute:
            heapq.heappush(self._heap, entry)
        else:
            self._later.setdefault(minute, []).append(entry)

    def pop_due(self, now_ms: int) -> Iterator[tuple[Any, ...]]:
        """Remove and yield, in order, every entry due at or before `now_ms`."""
        heap, later = self._heap, self._later
        minute = now_ms // MINUTE_MS
        if minute > self._minute:
            due: Iterable[int]
            if minute - self._minute > len(later):  # a long jump: visit only what exists
                due = sorted(m for m in later if m <= minute)
            else:
                due = range(self._minute + 1, minute + 1)
            for m in due:
                for entry in later.pop(m, ()):
                    heapq.heappush(heap, entry)
            self._minute = minute
        while heap and heap[0][0] <= now_ms:
            yield heapq.heappop(heap)

    def drain(self) -> Iterator[tuple[Any, ...]]:
        """Remove and yield every entry, in order."""
        while self._heap or self._later:
            if self._heap:
                yield heapq.heappop(self._heap)
            else:
                yield from self.pop_due(min(self._later) * MINUTE_MS)


def _shares(weights: Mapping[str, float], names: tuple[str, ...]) -> np.ndarray:
    raw = np.array([weights.get(name, 0.02) for name in names])
    shares: np.ndarray = raw / raw.sum()
    return shares


def _cumulative(weights: Iterable[float]) -> list[float]:
    total = 0.0
    out = []
    for weight in weights:
        total += weight
        out.append(total)
    return [c / total for c in out]


def _pick(cumulative: list[float], u: float) -> int:
    return min(bisect.bisect_right(cumulative, u), len(cumulative) - 1)


class _UserState:
    """A user's monoid states over earlier valid transactions (by event time), as the
    user_all and user_10m views hold them, plus the hidden profile."""

    __slots__ = ("index", "user_id", "key", "typical", "sigma", "home", "channel",
                 "count", "amount_sum", "amount_sum_sq", "amount_max", "recent")

    def __init__(self, index: int, user_id: str, typical: float, sigma: float, home: str,
                 channel: str) -> None:
        self.index = index
        self.user_id = user_id
        self.key = user_id.encode()
        self.typical = typical
        self.sigma = sigma
        self.home = home
        self.channel = channel
        self.count = 0
        self.amount_sum = 0
        self.amount_sum_sq = 0
        self.amount_max: int | None = None
        # (event_time_ms, cents) of the transactions in the current 10-minute window: a
        # few at most, so a list (56 bytes empty) rather than a deque (~600 bytes empty)
        self.recent: list[tuple[int, int]] = []


class _Simulation:
    """One run of the simulation; `run()` yields every message once, in send order."""

    def __init__(self, options: GeneratorOptions) -> None:
        self.o = options
        rng = np.random.default_rng(options.seed)
        self.r = _Randoms(rng)
        n_users, n_merchants = options.n_users, options.n_merchants

        width = len(str(n_users - 1))
        typical = np.clip(rng.lognormal(math.log(35.0), 0.9, n_users), 2.0, 2_000.0)
        sigma = rng.uniform(0.25, 0.6, n_users)
        homes = rng.choice(len(COUNTRIES), n_users, p=_shares(_COUNTRY_WEIGHTS, COUNTRIES))
        channels = rng.choice(len(CHANNELS), n_users, p=_shares(_CHANNEL_WEIGHTS, CHANNELS))
        self.users = [
            _UserState(i, f"u{i:0{width}d}", float(typical[i]), float(sigma[i]),
                       COUNTRIES[homes[i]], CHANNELS[channels[i]])
            for i in range(n_users)
        ]
        # busy users: activity ~ lognormal, the busiest 1% ~5x the median
        self.user_cum = _cumulative(rng.lognormal(0.0, 0.7, n_users).tolist())

        width = len(str(n_merchants - 1))
        self.merchant_ids = [f"m{i:0{width}d}" for i in range(n_merchants)]
        self.merchant_cats = [MERCHANT_CATEGORIES[i] for i in rng.choice(
            len(MERCHANT_CATEGORIES), n_merchants, p=_shares(_CATEGORY_WEIGHTS, MERCHANT_CATEGORIES))]
        # popularity: Zipf-like over a random order of merchants
        ranks = rng.permutation(n_merchants)
        self.merchant_cum = _cumulative((1.0 / (ranks + 5.0) ** 0.9).tolist())
        self.risky_cat_merchants = [m for m in range(n_merchants)
                                    if self.merchant_cats[m] in RISKY_CATEGORIES] or [0]
        n_risky_ids = max(3, n_merchants // 100)
        self.risky_merchants = rng.choice(n_merchants, min(n_risky_ids, n_merchants),
                                          replace=False).tolist()
        self.price = [_CATEGORY_PRICE.get(c, 1.0) for c in self.merchant_cats]

        self.seq = 0
        self.clock = options.start_ms
        self.candidates = 0  # transactions made, valid or not: the event id counter
        self.malformed_made = 0
        # what is due later, in (due_ms, tie) order, ties unique: late events as
        # (due, -1 - candidate, _Pending), labels as the compact (due, candidate, user index,
        # event_time_ms, p_true, is_fraud, compromised): ~12% of all labels are pending at
        # once (mean delay ~12 h), ~300 bytes each
        self.pending = _DueQueue(options.start_ms)
        self.recent_sent: deque[Message] = deque(maxlen=_DUPLICATE_POOL)
        self.id_prefix = f"tx-{options.seed}-"
        self.timestamp = _Timestamps().format

    # -- sending -------------------------------------------------------------------

    def _send(self, p: _Pending, sent_ms: int) -> Message:
        message = Message(p[0], p[1], p[2], p[3], self.seq, sent_ms, *p[4:])
        self.seq += 1
        if message.kind == KIND_VALID or message.kind == KIND_LATE:
            self.recent_sent.append(message)
        return message

    def _release_due(self) -> Iterator[Message]:
        # what fell due since the previous transaction goes out at its due time: all of it is
        # due after that transaction (delays are positive), so send times never decrease
        for entry in self.pending.pop_due(self.clock):
            yield self._send_pending(entry)

    def _send_pending(self, entry: tuple[Any, ...]) -> Message:
        if len(entry) == 3:
            return self._send(entry[2], entry[0])
        label_time, candidate, user_index, event_time, p_true, is_fraud, compromised = entry
        user = self.users[user_index]
        event_id = f"{self.id_prefix}{candidate}"
        value = (_LABEL_JSON % (event_id, user.user_id, "true" if is_fraud else "false",
                                self.timestamp(label_time))).encode()
        return self._send((LABELS_TOPIC, user.key, value, KIND_LABEL, event_id, user.user_id,
                           event_time, label_time, p_true, is_fraud, compromised), label_time)

    # -- the run -------------------------------------------------------------------

    def run(self) -> Iterator[Message]:
        o, r = self.o, self.r
        users = self.users
        m_cut = o.malformed_fraction
        d_cut = m_cut + o.duplicate_fraction
        l_cut = d_cut + o.late_fraction
        mean_gap = o.gap_ms
        bursts: list[tuple[int, int, int]] = []  # scheduled burst transactions (ms, tie, user)
        burst_tie = 0
        next_arrival = self.clock + max(1, round(-math.log(1.0 - r.uniform()) * mean_gap))
        n_users = len(users)
        for _ in range(o.events):
            if bursts and bursts[0][0] <= next_arrival:
                at, _tie, user_index = heapq.heappop(bursts)
                mode = 1  # compromised card, burst
            else:
                at = next_arrival
                next_arrival = at + max(1, round(-math.log(1.0 - r.uniform()) * mean_gap))
                user_index = _pick(self.user_cum, r.uniform())
                mode = 2 if r.uniform() < o.cnp_probability else 0
                if r.uniform() < o.burst_probability:
                    victim = r.index(n_users)
                    size = 3 + r.index(8)
                    burst_at = at
                    for _k in range(size):
                        burst_at += 2_000 + round(-math.log(1.0 - r.uniform()) * 25_000)
                        burst_tie += 1
                        heapq.heappush(bursts, (burst_at, burst_tie, victim))
            self.clock = max(at, self.clock + 1)
            yield from self._release_due()

            user = users[user_index]
            kind_draw = r.uniform()
            if kind_draw < m_cut:
                yield self._send(self._malformed(user, mode), self.clock)
            elif kind_draw < d_cut and self.recent_sent:
                original = self.recent_sent[r.index(len(self.recent_sent))]
                yield self._send((EVENTS_TOPIC, original.key, original.value, KIND_DUPLICATE,
                                  original.event_id, original.user_id, original.event_time_ms,
                                  None, math.nan, None, False), self.clock)
            elif d_cut <= kind_draw < l_cut:
                send_at = self.clock + round(r.between(o.late_min_ms, o.late_max_ms))
                tie = -1 - self.candidates  # labels' ties are their candidate numbers, >= 0
                event = self._transaction(user, mode, send_at=send_at)
                self.pending.push((send_at, tie, event))
            else:
                yield self._send(self._transaction(user, mode, send_at=None), self.clock)
        # the transactions end; simulated time runs on until every late event and label is sent
        for entry in self.pending.drain():
            yield self._send_pending(entry)

    # -- transactions ----------------------------------------------------------------

    def _draw(self, user: _UserState, mode: int) -> tuple[int, int, str, str]:
        """(merchant index, cents, country, channel) of a new transaction of `user`."""
        r = self.r
        if mode == 0:  # legit
            merchant = _pick(self.merchant_cum, r.uniform())
            amount = user.typical * self.price[merchant] * math.exp(user.sigma * r.normal())
            if r.uniform() < 0.005:  # a legit big purchase
                amount *= r.log_between(2.5, 6.0)
            channel = user.channel if r.uniform() < 0.8 else CHANNELS[r.index(len(CHANNELS))]
            country = user.home if r.uniform() < 0.95 else COUNTRIES[r.index(len(COUNTRIES))]
        else:  # a compromised card (burst) or a lone card-not-present fraud
            where = r.uniform()
            if where < 0.4:
                merchant = self.risky_merchants[r.index(len(self.risky_merchants))]
            elif where < 0.75:
                merchant = self.risky_cat_merchants[r.index(len(self.risky_cat_merchants))]
            else:
                merchant = _pick(self.merchant_cum, r.uniform())
            amount = user.typical * r.log_between(3.0, 20.0) * math.exp(0.2 * r.normal())
            channel = "online" if r.uniform() < 0.85 else CHANNELS[r.index(len(CHANNELS))]
            country = user.home if r.uniform() < 0.5 else COUNTRIES[r.index(len(COUNTRIES))]
        cents = min(max(round(amount * 100), 1), _MAX_CENTS)
        return merchant, cents, country, channel

    def _transaction(self, user: _UserState, mode: int, *, send_at: int | None) -> _Pending:
        """A valid transaction at the clock, to be sent now (`send_at` None) or late, at
        `send_at`: update the user's states, draw its label and schedule it."""
        o, r = self.o, self.r
        merchant, cents, country, channel = self._draw(user, mode)
        category = self.merchant_cats[merchant]
        now = self.clock

        # point-in-time features: the user's earlier transactions only (USER_10M window:
        # buckets bucket(now) - 9 .. bucket(now))
        window_start = USER_10M.window_buckets_of(now).start
        recent = user.recent
        if recent and recent[0][0] < window_start:
            keep = 1
            while keep < len(recent) and recent[keep][0] < window_start:
                keep += 1
            del recent[:keep]
        states: dict[str, dict[str, Any]] = {
            "user_10m": {"count": len(recent),
                         "amount_sum": sum([c for _, c in recent]) if recent else 0},
            "user_all": {"count": user.count, "amount_sum": user.amount_sum,
                         "amount_sum_sq": user.amount_sum_sq, "amount_max": user.amount_max},
        }
        event_fields = {"amount": cents, "merchant_category": category, "channel": channel}
        features = {name: derive(states, event_fields) for name, derive in _TRUE_MODEL_INPUTS}
        p_true = TRUE_FRAUD_MODEL.probability(features)
        is_fraud = r.uniform() < p_true

        recent.append((now, cents))
        user.count += 1
        user.amount_sum += cents
        user.amount_sum_sq += cents * cents
        if user.amount_max is None or cents > user.amount_max:
            user.amount_max = cents

        candidate = self.candidates
        self.candidates += 1
        event_id = f"{self.id_prefix}{candidate}"
        value = (_EVENT_JSON % (
            event_id, user.user_id, self.merchant_ids[merchant], category,
            cents // 100, cents % 100, _CURRENCY_OF.get(country, "EUR"), country, channel,
            self.timestamp(now),
        )).encode()
        delay = r.log_between(o.label_delay_min_ms, o.label_delay_max_ms)
        label_time = now + round(delay)
        if send_at is not None:  # no chargeback before its transaction reached anyone
            label_time = max(label_time, send_at + 1)
        compromised = mode != 0
        self.pending.push((label_time, candidate, user.index, now, p_true, is_fraud, compromised))
        return (EVENTS_TOPIC, user.key, value, KIND_VALID if send_at is None else KIND_LATE,
                event_id, user.user_id, now, label_time, p_true, is_fraud, compromised)

    def _malformed(self, user: _UserState, mode: int) -> _Pending:
        """A transaction that breaks exactly one rule of TRANSACTIONS; the rules take turns.
        It never enters the user's history: the platform rejects it."""
        r = self.r
        rule = MALFORMED_KINDS[self.malformed_made % len(MALFORMED_KINDS)]
        self.malformed_made += 1
        merchant, cents, country, channel = self._draw(user, mode)
        event_id = f"{self.id_prefix}{self.candidates}"
        self.candidates += 1
        document: dict[str, Any] = {
            "event_id": event_id,
            "user_id": user.user_id,
            "merchant_id": self.merchant_ids[merchant],
            "merchant_category": self.merchant_cats[merchant],
            "amount": cents / 100,
            "currency": _CURRENCY_OF.get(country, "EUR"),
            "country": country,
            "channel": channel,
            "event_time": format_timestamp_ms(self.clock),
        }
        variant = r.uniform()
        if rule == "missing":
            del document[TRANSACTIONS.field_names[r.index(len(TRANSACTIONS.field_names))]]
        elif rule == "wrong_type":
            name = ("amount", "event_time", "channel", "user_id")[r.index(4)]
            document[name] = {"amount": f"{cents / 100:.2f}", "event_time": self.clock,
                              "channel": 1, "user_id": 4711}[name]
        elif rule == "out_of_range":
            document["amount"] = (0, -round(cents / 100 + 1.0, 2), MAX_AMOUNT + 0.01, 1e9)[r.index(4)]
        elif rule == "unknown_field":
            document[("cvv", "note", "amount_eur")[r.index(3)]] = "123"
        elif rule == "not_allowed":
            name, value = (("merchant_category", "weapons"), ("merchant_category", "lottery"),
                           ("currency", "JPY"), ("country", "XX"), ("channel", "phone"))[r.index(5)]
            document[name] = value
        elif rule == "bad_timestamp":
            document["event_time"] = (
                format_timestamp_ms(self.clock)[:19].replace("T", " "),  # no UTC offset
                "2026-02-30T10:00:00.000Z", "yesterday", "2026-01-01T25:00:00Z",
            )[r.index(4)]
        text = json.dumps(document, separators=(",", ":"))
        if rule == "malformed_json":
            # a truncated object (never valid JSON) or plain text
            text = text[: 1 + int(variant * (len(text) - 2))] if variant < 0.75 else (
                f"user={user.user_id};amount={cents / 100:.2f}"
            )
        raw_id = document.get("event_id") if rule != "malformed_json" else None
        return (EVENTS_TOPIC, user.key, text.encode(), MALFORMED_PREFIX + rule,
                raw_id if isinstance(raw_id, str) else None, user.user_id, self.clock,
                None, math.nan, None, False)


def generate(options: GeneratorOptions) -> Iterator[Message]:
    """Every message of one simulation, in send order (see the module's data contracts).

    Memory stays bounded by the users' states and what is pending (labels up to
    `label_delay_max_ms` ahead, late events): nothing else is kept once yielded.
    """
    return _Simulation(options).run()
