"""The paced Kafka sink: `produce` sends simulated messages through a producer at a capped
rate, and `generate_and_produce` is `lambdalake generate` in one call (simulate, send, and
write the ground-truth file as the messages go by).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lakehouse.errors import ConfigError, ServiceError
from lakehouse.generator.ground_truth import TruthWriter
from lakehouse.generator.simulation import (
    EVENTS_TOPIC,
    KIND_LATE,
    KIND_VALID,
    LABELS_TOPIC,
    GeneratorOptions,
    Message,
    generate,
)


class Producer(Protocol):
    """What `produce` needs of a Kafka producer (kafka-python's KafkaProducer has it)."""

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> Any: ...

    def flush(self, timeout: float | None = None) -> None: ...


@dataclass(frozen=True)
class GenerateSummary:
    """What `produce` sent: counts per topic and per kind, and the wall-clock seconds taken
    (from the first message to the end of the final flush)."""

    messages: int
    by_topic: dict[str, int]
    by_kind: dict[str, int]
    elapsed_s: float

    @property
    def rate(self) -> float:
        """Messages per second, acknowledgements included."""
        return self.messages / self.elapsed_s if self.elapsed_s > 0 else math.inf


_PACING_AHEAD_S = 0.001  # sleep only when at least this far ahead of the schedule
_PACING_BURST_S = 0.2  # after a stall, catch up with at most this much time's worth at once
_PROGRESS_EVERY = 1_000


def produce(messages: Iterable[Message], *, producer: Producer, rate: float | None = None,
            progress: bool = False, total_events: int | None = None,
            flush_timeout_s: float = 120.0) -> GenerateSummary:
    """Send every message with `producer.send(topic, key=..., value=...)`, then flush.

    `rate` caps the pace in messages per second (both topics) by sleeping, never spinning;
    None sends as fast as the producer takes them. `progress` shows a rich progress bar on
    stderr: events sent (of `total_events` when given) and labels sent (of those owed so
    far, one per valid or late event). Raises ServiceError when Kafka refuses a message or
    does not acknowledge one by the end of the flush.
    """
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float)
                             or not (math.isfinite(rate) and rate > 0)):
        raise ConfigError(f"rate must be a positive number of messages per second (got {rate!r})")
    from kafka.errors import KafkaError

    failures: list[BaseException] = []
    by_topic: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    interval = 1.0 / rate if rate is not None else 0.0
    sent = 0
    with _ProgressBar(progress, total_events) as bar:
        started = next_at = time.monotonic()
        try:
            for message in messages:
                if interval:
                    now = time.monotonic()
                    next_at = max(next_at, now - _PACING_BURST_S) + interval
                    if next_at - now >= _PACING_AHEAD_S:
                        time.sleep(next_at - now)
                future = producer.send(message.topic, key=message.key, value=message.value)
                add_errback = getattr(future, "add_errback", None)
                if add_errback is not None:
                    add_errback(failures.append)
                by_topic[message.topic] += 1
                by_kind[message.kind] += 1
                sent += 1
                if sent % _PROGRESS_EVERY == 0:
                    bar.show(by_topic, by_kind)
            producer.flush(timeout=flush_timeout_s)
        except KafkaError as exc:
            raise ServiceError(f"Kafka refused a message after {sent} were sent ({exc!r}): "
                               "is the platform up (`lambdalake status`)?") from None
        elapsed = time.monotonic() - started
        bar.show(by_topic, by_kind)
    if failures:
        raise ServiceError(f"{len(failures)} of {sent} messages were not acknowledged by Kafka "
                           f"(first: {failures[0]!r})")
    return GenerateSummary(sent, dict(by_topic), dict(by_kind), elapsed)


def generate_and_produce(options: GeneratorOptions, *, producer: Producer,
                         rate: float | None = None, progress: bool = False,
                         truth_path: str | Path | None = None) -> GenerateSummary:
    """`lambdalake generate` in one call: simulate, send, and write the truth file (when
    `truth_path` is given) as the messages go by. When sending fails midway the truth file
    is still closed and readable, and covers exactly the messages `producer.send` took."""
    messages = generate(options)
    if truth_path is None:
        return produce(messages, producer=producer, rate=rate, progress=progress,
                       total_events=options.events)
    with TruthWriter(truth_path) as truth:
        return produce(truth.tee(messages), producer=producer, rate=rate, progress=progress,
                       total_events=options.events)


class _ProgressBar:
    """A rich progress display of `produce` on stderr, or nothing when disabled."""

    def __init__(self, enabled: bool, total_events: int | None) -> None:
        self._progress: Any = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description:>7}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
        )
        self._events = self._progress.add_task(EVENTS_TOPIC, total=total_events)
        self._labels = self._progress.add_task(LABELS_TOPIC, total=0)

    def show(self, by_topic: Counter[str], by_kind: Counter[str]) -> None:
        if self._progress is None:
            return
        owed = by_kind[KIND_VALID] + by_kind[KIND_LATE]
        self._progress.update(self._events, completed=by_topic[EVENTS_TOPIC])
        self._progress.update(self._labels, completed=by_topic[LABELS_TOPIC], total=owed)

    def __enter__(self) -> _ProgressBar:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()
