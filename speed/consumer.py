"""The speed layer: Kafka → validation → point-in-time features → Ray Serve → Delta, exactly once.

One `SpeedLayer` is one member of a Kafka consumer group on the events topic. Each
micro-batch (bounded by `max_batch` records and `max_wait_ms`):

1. parses every record with the spec's validation routine (the batch layer's), given its
   Kafka key and timestamp; an invalid record, or a later copy of an event already scored
   (same key entity and id, `RecordSchema.dedup_scope`, as the batch layer deduplicates),
   goes to the DLQ topic with its reason, original key and bytes, and source
   topic/partition/offset in the headers. A value larger than `dlq_max_value_bytes` is
   stored truncated, its original size and SHA-256 in the headers (bronze keeps it whole).
   Every DLQ delivery is acknowledged before anything of the batch is committed: a failed
   one stops the layer (ServiceError) with nothing committed, so the batch is replayed.
   Each source partition's DLQ records go to one DLQ partition (source partition modulo
   the DLQ's partitions), and each Kafka offset commit records, in its metadata, where in
   that DLQ partition records of later offsets can start; a member taking a partition over
   reads the DLQ from there and does not send again what a crashed predecessor delivered
   before its commit. So each (partition, offset) reaches the DLQ exactly once;
2. computes each valid event's features in offset order from `SpeedState` (the adopted
   batch run's views ⊕ the increments after its boundary), then folds the event in;
3. scores the batch through the model service's deployment handle (the `/predict` path);
4. appends the scored rows to Delta `speed/scored_events` with one app transaction per
   (group, topic, partition) = the last offset consumed; only then commits Kafka offsets.

On (re)assignment a member seeks each partition to what Delta recorded and rebuilds its
state from the newest batch run it has consumed past plus the events scored above that run's
boundary, so a crash anywhere, or a rebalance, scores every event once. DLQ delivery is
at-least-once: a record can reach the DLQ twice after a crash between produce and commit
(its headers name the source partition and offset, the key to deduplicate on).

A newer published batch run is loaded in a background thread and swapped in between two
micro-batches once this member has consumed past its boundary in every partition it owns
(`SpeedState.adopt`): scoring never pauses for it.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from lakehouse import scored
from lakehouse.config import Settings, options_from_settings, setting_field
from lakehouse.errors import ServiceError, ValidationError
from lakehouse.serve import Scorer
from lakehouse.spec import PlatformSpec
from lakehouse.streams import kafka_client_config
from lakehouse.tables import BatchRun, Lakehouse, published_runs
from speed import lake, metrics
from speed.state import PreparedBase, SpeedState

log = logging.getLogger("lambdalake.speed")



@dataclass(frozen=True)
class SpeedOptions:
    group_id: str = setting_field("speed_group")
    max_batch: int = 2000
    max_wait_ms: int = 200
    run_check_s: float = 5.0  # how often to look for a newer published batch run
    score_retries: int = 5
    session_timeout_s: float = 10.0  # a member that stops heartbeating leaves the group after this
    # a DLQ record keeps at most this much of the value (the broker refuses ~1 MB records)
    dlq_max_value_bytes: int = 524_288
    # resuming below the oldest offset Kafka still holds: "fail" (ServiceError with the
    # numbers) or "skip" (start at the oldest, logged and counted as lost)
    on_missing_offsets: Literal["fail", "skip"] = "fail"

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> SpeedOptions:
        """Options for `settings` (the consumer group); `overrides` set any field."""
        return options_from_settings(cls, settings, **overrides)


class SpeedLayer:
    def __init__(self, settings: Settings, spec: PlatformSpec, scorer: Scorer, *,
                 lakehouse: Lakehouse | None = None, options: SpeedOptions | None = None) -> None:
        self.settings = settings
        self.spec = spec
        self.scorer = scorer
        self.lakehouse = lakehouse or Lakehouse(settings.delta_uri)
        self.options = options if options is not None else SpeedOptions.from_settings(settings)
        self.topic = spec.events.topic
        self.dlq_topic = spec.topics[2]
        self.schema = scored.scored_schema(spec)
        self.state = SpeedState(spec)
        self.owned: set[int] = set()
        # partition → (key entity, id) of the events scored from it: a later copy goes to the DLQ
        self.seen: dict[int, set[tuple[Any, Any]]] = {}
        self._dlq_sent: list[Any] = []  # this batch's DLQ deliveries, acknowledged before commit
        self._dlq_partitions = 0  # of the DLQ topic, known at the first send
        self._dlq_from: dict[int, int] = {}  # DLQ partition → offset later records land at or after
        self._dlq_done: dict[int, set[int]] = {}  # source partition → offsets already in the DLQ
        self._dlq_pending: dict[int, int] = {}  # assigned partitions whose DLQ is not read yet → resume
        self._pending_run: tuple[BatchRun, PreparedBase] | None = None
        self._loading = False
        self._last_run_check = 0.0
        self._last_lag_report = 0.0
        self._idle_since = time.monotonic()
        self._consumer: Any = None
        self._producer: Any = None
        self.counts = {"scored": 0, "dlq": 0, "batches": 0}
        # called after each Delta commit with the rows it wrote and the commit's wall time (s)
        self.on_commit: Callable[[list[dict[str, Any]], float], None] | None = None

    # -------------------------------------------------------------- Kafka plumbing
    def _connect(self) -> None:
        from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer

        layer = self

        class Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # kafka-python is untyped
            def on_partitions_revoked(self, revoked: Any) -> None:
                layer._revoke({tp.partition for tp in revoked})

            def on_partitions_assigned(self, assigned: Any) -> None:
                layer._assign({tp.partition for tp in assigned})

            def on_partitions_lost(self, lost: Any) -> None:
                layer._revoke({tp.partition for tp in lost})

        scored.ensure_scored_table(self.lakehouse, self.schema)
        self._consumer = KafkaConsumer(
            **kafka_client_config(self.settings),
            group_id=self.options.group_id,
            enable_auto_commit=False,
            # never jump silently: an offset Kafka no longer holds raises, `_missing_offsets`
            auto_offset_reset="none",
            max_poll_records=self.options.max_batch,
            session_timeout_ms=int(self.options.session_timeout_s * 1000),
            client_id=f"lambdalake-speed-{threading.get_native_id()}",
        )
        self._consumer.subscribe(topics=[self.topic], listener=Listener())
        self._producer = KafkaProducer(**kafka_client_config(self.settings), acks="all", linger_ms=5)

    def _dlq_partition(self, source_partition: int) -> int:
        if not self._dlq_partitions:
            self._dlq_partitions = len(self._producer.partitions_for(self.dlq_topic))
        return source_partition % self._dlq_partitions

    def _recover_dlq(self, partitions: set[int], resume: dict[int, int]) -> None:
        """The offsets at or above each resume point that a predecessor (this group, a crashed
        or revoked member) already delivered to the DLQ: they are not sent again. Reads each
        DLQ partition from where the group's last offset commit said later records start
        (the DLQ's beginning before the first commit): one micro-batch's worth, not the DLQ's
        history."""
        from kafka import KafkaConsumer, TopicPartition

        starts: dict[int, int] = {}
        for p in partitions:
            committed = self._consumer.committed(TopicPartition(self.topic, p), metadata=True)
            try:
                start = int(json.loads(committed.metadata)["dlq_from"]) if committed else 0
            except (ValueError, KeyError, TypeError):
                start = 0
            d = self._dlq_partition(p)
            starts[d] = min(starts.get(d, start), start)
            self._dlq_done[p] = set()
        reader = KafkaConsumer(**kafka_client_config(self.settings), enable_auto_commit=False,
                               max_partition_fetch_bytes=4 * 1024 * 1024)
        try:
            tps = {d: TopicPartition(self.dlq_topic, d) for d in starts}
            reader.assign(list(tps.values()))
            ends = reader.end_offsets(list(tps.values()))
            oldest = reader.beginning_offsets(list(tps.values()))
            for d, tp in tps.items():
                self._dlq_from[d] = max(self._dlq_from.get(d, 0), ends[tp])
                reader.seek(tp, max(starts[d], oldest[tp]))
            deadline = time.monotonic() + 120
            while any(reader.position(tp) < ends[tp] for tp in tps.values()):
                if time.monotonic() > deadline:
                    raise ServiceError(f"the DLQ topic {self.dlq_topic!r} could not be read to its end")
                for records in reader.poll(timeout_ms=1000).values():
                    for r in records:
                        h = dict(r.headers)
                        try:
                            source = int(h.get("source_partition", b"-1"))
                            offset = int(h.get("source_offset", b"-1"))
                        except ValueError:
                            continue
                        if (source in partitions and offset >= resume[source]
                                and h.get("source_topic") == self.topic.encode()
                                and h.get("consumer_group") == self.options.group_id.encode()):
                            self._dlq_done[source].add(offset)
        finally:
            reader.close()
        found = {p: len(o) for p, o in self._dlq_done.items() if o}
        if found:
            log.info(json.dumps({"event": "dlq_recovered", "already_delivered": found}))

    def _missing_offsets(self, partition: int, wanted: int, oldest: int) -> int:
        """Kafka no longer holds offsets wanted..oldest-1 of a partition (retention deleted
        them before this group scored them): fail with the numbers, or, with the "skip"
        policy, resume at the oldest offset and log and count what was lost."""
        lost = oldest - wanted
        message = (f"partition {partition} of {self.topic!r} must resume at offset {wanted}, but Kafka "
                   f"holds offsets from {oldest} only: {lost} records were deleted before the speed "
                   f"layer scored them")
        if self.options.on_missing_offsets != "skip":
            raise ServiceError(message + "; raise the topic's retention, or restart with "
                               "--on-missing-offsets skip to accept the loss")
        metrics.EVENTS.labels("lost").inc(lost)
        log.error(json.dumps({"event": "offsets_skipped", "partition": partition, "from": wanted,
                              "to": oldest, "records": lost}))
        return oldest

    def _revoke(self, partitions: set[int]) -> None:
        mine = partitions & self.owned
        if not mine:
            return
        self.owned -= mine
        self._idle_since = time.monotonic()
        for p in mine:
            self.seen.pop(p, None)
        self.state.release(mine)
        metrics.OWNED_PARTITIONS.set(len(self.owned))
        log.info(json.dumps({"event": "partitions_revoked", "partitions": sorted(mine)}))

    def _assign(self, partitions: set[int]) -> None:
        """Seek the new partitions to what Delta recorded and rebuild the state."""
        from kafka import TopicPartition

        self.owned |= partitions
        self._idle_since = time.monotonic()
        resume = scored.resume_offsets(self.lakehouse, self.options.group_id, self.topic, sorted(self.owned))
        # Only local calls here: the callback runs inside kafka-python's network loop. A resume
        # offset Kafka no longer holds surfaces in the next poll (`_poll`), and the DLQ is read
        # (`_recover_dlq`) before any record of these partitions is processed.
        for p in partitions:
            self._consumer.seek(TopicPartition(self.topic, p), resume[p])
            self._dlq_pending[p] = resume[p]
        self.state = self._rebuild(resume)
        self._pending_run = None
        metrics.OWNED_PARTITIONS.set(len(self.owned))
        log.info(json.dumps({"event": "partitions_assigned", "partitions": sorted(partitions),
                             "resume": {str(p): resume[p] for p in sorted(partitions)},
                             "batch_run": self.state.base.run_id}))

    def _rebuild(self, resume: dict[int, int]) -> SpeedState:
        """State for the owned partitions: the newest run consumed past in all of them, plus
        the events scored above its boundary."""
        state = SpeedState(self.spec)
        state.positions.update(resume)
        for run in published_runs(self.lakehouse):
            if run.spec_fingerprint == self.spec.fingerprint() and state.can_adopt(run.boundary, self.owned):
                state.adopt(run.run_id, run.boundary, lake.gold_rows(self.lakehouse, self.spec, run))
                break
        for p in sorted(self.owned):
            history = lake.scored_history(self.lakehouse, self.spec, p, below=resume[p])
            self.seen[p] = {self.spec.events.dedup_key(event) for _, event in history}
            state.restore(p, history, next_offset=resume[p])
        return state

    # -------------------------------------------------------------- batch handover
    def _check_for_new_run(self) -> None:
        """Start loading a newer published run in the background; install it between two
        batches once it is ready and this member has consumed past its boundary."""
        if self._pending_run is not None:
            run, prepared = self._pending_run
            if self.state.can_adopt(run.boundary, self.owned):
                dropped = self.state.install(prepared)
                self._pending_run = None
                metrics.BATCH_RUN.info({"run_id": run.run_id})
                log.info(json.dumps({"event": "batch_run_adopted", "run_id": run.run_id,
                                     "boundary": {str(p): o for p, o in run.boundary.items()},
                                     "increments_dropped": dropped}))
            return
        if self._loading or time.monotonic() - self._last_run_check < self.options.run_check_s:
            return
        self._last_run_check = time.monotonic()
        runs = published_runs(self.lakehouse)
        if not runs or runs[0].run_id == self.state.base.run_id:
            return
        run = runs[0]
        if run.spec_fingerprint != self.spec.fingerprint():
            return

        def load() -> None:
            try:
                prepared = self.state.prepare(run.run_id, run.boundary,
                                              lake.gold_rows(self.lakehouse, self.spec, run))
                self._pending_run = (run, prepared)
            except Exception as exc:  # noqa: BLE001 - keep scoring on the current base
                log.error(json.dumps({"event": "batch_run_load_failed", "run_id": run.run_id,
                                      "error": f"{type(exc).__name__}: {exc}"}))
            finally:
                self._loading = False

        self._loading = True
        threading.Thread(target=load, name="batch-run-loader", daemon=True).start()

    # -------------------------------------------------------------- the loop
    def run(self, stop: threading.Event, *, max_events: int | None = None,
            idle_exit_s: float | None = None) -> dict[str, int]:
        """Consume until `stop` is set (SIGTERM), `max_events` records were handled, or
        nothing arrived for `idle_exit_s`; the current batch always completes first.

        Idle time counts from the last record or the last rebalance. While this member owns
        no partitions (joining, or a killed member not yet timed out of the group) it waits
        two session timeouts longer, so a restart does not give up before its assignment."""
        self._connect()
        self._idle_since = time.monotonic()
        handled = 0
        try:
            while not stop.is_set():
                polled = self._poll()
                if self._dlq_pending:
                    pending, self._dlq_pending = self._dlq_pending, {}
                    self._recover_dlq(set(pending), pending)
                self._check_for_new_run()
                records = [r for tp_records in polled.values() for r in tp_records]
                if not records:
                    if idle_exit_s is not None and self._idle(idle_exit_s):
                        break
                    self._report_lag()
                    continue
                self._idle_since = time.monotonic()
                self._process(records)
                self._report_lag()
                handled += len(records)
                if max_events is not None and handled >= max_events:
                    break
        finally:
            self.close()
        return dict(self.counts)

    def _poll(self) -> dict[Any, list[Any]]:
        from kafka.errors import OffsetOutOfRangeError

        try:
            polled: dict[Any, list[Any]] = self._consumer.poll(timeout_ms=self.options.max_wait_ms,
                                                               max_records=self.options.max_batch)
            return polled
        except OffsetOutOfRangeError as exc:  # retention deleted records ahead of this member
            from kafka import TopicPartition

            named = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}  # {tp: offset}
            partitions = list(named) or [TopicPartition(self.topic, p) for p in sorted(self.owned)]
            oldest = self._consumer.beginning_offsets(partitions)
            for tp in partitions:
                wanted = self.state.positions.get(tp.partition, 0)
                if wanted < oldest[tp]:
                    self._consumer.seek(tp, self._missing_offsets(tp.partition, wanted, oldest[tp]))
            return {}

    def _idle(self, idle_exit_s: float) -> bool:
        allowed = idle_exit_s if self.owned else idle_exit_s + 2 * self.options.session_timeout_s
        return time.monotonic() - self._idle_since > allowed

    def _process(self, records: list[Any]) -> None:
        from kafka.errors import CommitFailedError
        from kafka.structs import OffsetAndMetadata, TopicPartition

        started = time.perf_counter()
        # Each partition in offset order (exact for the entity that keys the messages);
        # partitions interleaved by record timestamp, so entities spread over partitions
        # (merchants) see events close to the batch layer's (event time, partition, offset)
        # order.
        per_partition: dict[int, list[Any]] = {}
        for record in records:
            per_partition.setdefault(record.partition, []).append(record)
        records = list(heapq.merge(*[sorted(rs, key=lambda r: r.offset) for rs in per_partition.values()],
                                   key=lambda r: (r.timestamp, r.partition)))
        rows: list[dict[str, Any]] = []
        vectors: list[list[float]] = []
        last: dict[int, int] = {}
        dlq = 0
        schema = self.spec.events
        time_field = schema.time_field
        for record in records:
            last[record.partition] = record.offset
            try:
                event = schema.parse(record.value, key=record.key,
                                     arrival_ms=record.timestamp if record.timestamp >= 0 else None)
            except ValidationError as invalid:
                self._to_dlq(record, invalid.reasons)
                self.state.skip(record.partition, record.offset)
                dlq += 1
                continue
            seen = self.seen.setdefault(record.partition, set())
            identity = schema.dedup_key(event)
            if identity in seen:
                self._to_dlq(record, [f"duplicate:{schema.id_field}"])
                self.state.skip(record.partition, record.offset)
                dlq += 1
                continue
            seen.add(identity)
            vectors.append(self.state.features(event))
            self.state.add(dict(event), record.partition, record.offset)
            rows.append({**event, time_field: event[time_field] * 1000,
                         "partition": record.partition, "offset": record.offset,
                         "kafka_timestamp": record.timestamp * 1000})
        feature_ms = (time.perf_counter() - started) * 1000
        scores, version, model_ms = self._score(vectors)
        scored_at = lake.now_utc()
        for row, vector, score in zip(rows, vectors, scores, strict=True):
            row.update(features=vector, score=score, model_version=version,
                       batch_run_id=self.state.base.run_id, consumer_group=self.options.group_id,
                       scored_at=scored_at, feature_ms=feature_ms / max(1, len(rows)),
                       model_ms=model_ms)
        if dlq:
            self._await_dlq()
        written = lake.append_scored(self.lakehouse, self.schema, rows, last,
                                     group=self.options.group_id, topic=self.topic)
        if written < len(rows):  # another member owns these partitions now and wrote them
            log.warning(json.dumps({"event": "stale_rows_skipped", "rows": len(rows) - written}))
        # where this group's DLQ records of later offsets can start (see `_recover_dlq`)
        try:
            self._consumer.commit({
                TopicPartition(self.topic, p): OffsetAndMetadata(
                    o + 1, json.dumps({"dlq_from": self._dlq_from.get(self._dlq_partition(p), 0)}), -1)
                for p, o in last.items()})
        except CommitFailedError:  # the group rebalanced while this batch ran (a stalled member)
            log.warning(json.dumps({"event": "offset_commit_refused", "partitions": sorted(last),
                                    "why": "the group rebalanced; Delta's app transactions decide "
                                           "where each partition resumes"}))
        committed = time.time()
        if self.on_commit is not None:
            self.on_commit(rows, committed)
        now_ms = committed * 1000
        for row in rows:
            metrics.END_TO_END.observe((now_ms - row["kafka_timestamp"] / 1000) / 1000)
        metrics.EVENTS.labels("scored").inc(written)
        metrics.EVENTS.labels("dlq").inc(dlq)
        metrics.BATCH_SIZE.observe(len(records))
        if rows:
            metrics.MODEL_VERSION.set(version)
        self.counts["scored"] += written
        self.counts["dlq"] += dlq
        self.counts["batches"] += 1

    def _score(self, vectors: list[list[float]]) -> tuple[list[float], int, float]:
        if not vectors:
            return [], 0, 0.0
        delay = 0.5
        for attempt in range(self.options.score_retries + 1):
            started = time.perf_counter()
            try:
                scores, version = self.scorer(vectors)
                elapsed = time.perf_counter() - started
                metrics.SCORING_LATENCY.observe(elapsed)
                return scores, version, elapsed * 1000
            except Exception as exc:  # noqa: BLE001 - retried, then raised as ServiceError
                if attempt == self.options.score_retries:
                    raise ServiceError(f"the model service failed {attempt + 1} times: {exc}") from exc
                log.warning(json.dumps({"event": "scoring_retry", "attempt": attempt + 1,
                                        "error": f"{type(exc).__name__}: {exc}"}))
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _to_dlq(self, record: Any, reasons: list[str]) -> None:
        if record.offset in self._dlq_done.get(record.partition, ()):
            return  # delivered by a predecessor that crashed before its commit
        value = record.value
        headers = [("source_topic", record.topic.encode()),
                   ("source_partition", str(record.partition).encode()),
                   ("source_offset", str(record.offset).encode()),
                   ("consumer_group", self.options.group_id.encode())]
        limit = self.options.dlq_max_value_bytes
        if value is not None and len(value) > limit:
            headers += [("original_size", str(len(value)).encode()),
                        ("original_sha256", hashlib.sha256(value).hexdigest().encode())]
            reasons = [*reasons, f"dlq_truncated: the value kept its first {limit} of {len(value)} bytes "
                                 "(bronze holds it whole)"]
            value = value[:limit]
        key = record.key if record.key is None or len(record.key) <= 1024 else record.key[:1024]
        self._dlq_sent.append(self._producer.send(
            self.dlq_topic, key=key, value=value, partition=self._dlq_partition(record.partition),
            headers=[("reason", "; ".join(reasons).encode()), *headers]))

    def _await_dlq(self) -> None:
        """Every DLQ record of this batch acknowledged, or ServiceError before any commit."""
        sent, self._dlq_sent = self._dlq_sent, []
        self._producer.flush(timeout=60)
        failed = [f for f in sent if not f.is_done or f.failed()]
        if failed:
            first = failed[0].exception if failed[0].is_done else "no acknowledgement within 60 s"
            raise ServiceError(f"{len(failed)} of {len(sent)} DLQ records of this micro-batch were not "
                               f"delivered to {self.dlq_topic!r} ({first!r}); nothing of the batch was "
                               "committed: it is consumed again on restart")
        for future in sent:
            placed = future.value  # RecordMetadata of the acknowledged record
            self._dlq_from[placed.partition] = max(self._dlq_from.get(placed.partition, 0), placed.offset + 1)

    def _report_lag(self) -> None:
        from kafka import TopicPartition

        if not self.owned or time.monotonic() - self._last_lag_report < 5.0:
            return
        self._last_lag_report = time.monotonic()
        partitions = [TopicPartition(self.topic, p) for p in sorted(self.owned)]
        try:
            ends = self._consumer.end_offsets(partitions)
        except Exception:  # noqa: BLE001 - lag is best-effort observability
            return
        for tp in partitions:
            metrics.LAG.labels(str(tp.partition)).set(ends[tp] - self.state.positions.get(tp.partition, 0))

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
            self._consumer = None
        if self._producer is not None:
            self._producer.flush()
            self._producer.close()
            self._producer = None
