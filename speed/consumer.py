"""The speed layer: Kafka → validation → point-in-time features → Ray Serve → the online
store (then Delta), exactly once.

One `SpeedLayer` is one member of a Kafka consumer group on the events topic. Each
micro-batch (bounded by `max_batch` records and `max_wait_ms`):

1. parses every record with the spec's validation routine (the batch layer's), given its
   Kafka key and timestamp; an invalid record, or a later copy of an event already taken
   (same key entity and id, `RecordSchema.dedup_scope`, as the batch layer deduplicates:
   the store's seen set, plus the micro-batch's own), goes to the DLQ topic with its reason,
   original key and bytes, and source topic/partition/offset in the headers. Duplicates
   are judged by the rule of `lakehouse.dedup` (within the schema's horizon, from the
   partition's clock and the identities the store's seen set holds with their clocks). A value
   larger than `dlq_max_value_bytes` is stored truncated, its original size and SHA-256 in
   the headers (bronze keeps it whole). Every DLQ delivery is acknowledged before anything
   of the batch is committed: a failed one stops the layer (ServiceError) with nothing
   committed, so the batch is replayed. Each source partition's DLQ records go to one DLQ
   partition (source partition modulo the DLQ's partitions), and each Kafka offset commit
   records, in its metadata, where in that DLQ partition records of later offsets can
   start; a member taking a partition over reads the DLQ from there and does not send
   again what a crashed predecessor delivered before its store step. So each (partition,
   offset) reaches the DLQ exactly once;
2. reads the online store once (every partition's increments after the adopted batch
   run's cut, and their coverage vector, with the seen set's look-up of the batch's
   identities, which step 1 judges duplicates by) and computes each valid event's features as of
   that vector, its own partition's earlier offsets included (`speed.state`). A partition
   that a newer run floored (the group never stepped it) waits, paused, until that run is
   adopted: only its views hold the offsets the floor passed over (`_defer`);
3. scores the batch through the model service's deployment handle (the `/predict` path);
4. applies it to the store: one atomic step per partition with its monoid-state
   increments, its scored rows (the outbox), its events' identities and its last offset.
   A step at or below the store's applied offset changes nothing, and records at or below
   it (applied by another member, or covered by a batch run's floor) are dropped before
   they are scored: a replay after a crash, or a fenced member, counts nothing twice. Then
   the Kafka offsets are committed, without waiting (their metadata is all the layer reads back).

Every `flush_s` (and when it takes partitions over) a member's flusher thread appends the
rows the store's outbox holds for its partitions to Delta `speed/scored_events`, one commit
with one app transaction per (group, topic, partition) = the store's applied offset, and
then drops them from the outbox: Delta follows the store, off the hot path (the scoring loop
never waits for it), each row once. The member keeps a copy of the rows it stepped
(`OutboxCopy`), so a flush reads the outbox back from the store only where the copy may
miss rows (a partition just taken over, or one another member stepped in between).

On (re)assignment a member seeks each partition to the store's applied offset + 1: a
restart costs what the new records cost, not the history. A newer published batch run is
loaded in a background thread and swapped in between two micro-batches (`SpeedState`):
scoring never pauses for it. When the store cannot be reached the layer waits (logged,
counted) and resumes where it stood; a store that lost state (its applied offset below
what this member consumed) stops the layer with StoreBehindError.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, TypeVar

import msgspec

from lakehouse import scored
from lakehouse.config import Settings, options_from_settings, setting_field
from lakehouse.dedup import CLOCK, NO_CLOCK, Dedup
from lakehouse.errors import ServiceError, ValidationError
from lakehouse.online import open_store
from lakehouse.online.base import OnlineStore, Step, StoreBehindError, event_identity, increments_of
from lakehouse.serve import Scorer
from lakehouse.spec import PlatformSpec
from lakehouse.streams import home_partition, kafka_client_config
from lakehouse.tables import BatchRun, Lakehouse, RunLog
from speed import lake, metrics
from speed.state import PreparedBase, SpeedState

log = logging.getLogger("lambdalake.speed")



_T = TypeVar("_T")


@dataclass(frozen=True)
class SpeedOptions:
    group_id: str = setting_field("speed_group")
    max_batch: int = 2000
    max_wait_ms: int = setting_field("speed_max_wait_ms")
    flush_s: float = setting_field("speed_flush_s")  # how often the outbox goes to Delta
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


@dataclass
class _Taken:
    """A valid event of the micro-batch that the store does not hold yet."""

    offset: int
    event: dict[str, Any]
    identity: str
    clock: int  # its clock (`lakehouse.dedup`), epoch ms
    row: dict[str, Any] = field(default_factory=dict)


class SpeedLayer:
    def __init__(self, settings: Settings, spec: PlatformSpec, scorer: Scorer, *,
                 lakehouse: Lakehouse | None = None, options: SpeedOptions | None = None,
                 store: OnlineStore | None = None) -> None:
        self.settings = settings
        self.spec = spec
        self.scorer = scorer
        self.lakehouse = lakehouse or Lakehouse(settings.delta_uri)
        self._run_log = RunLog(self.lakehouse)  # looked at every run_check_s: new log entries only
        self.options = options if options is not None else SpeedOptions.from_settings(settings)
        self.store = store if store is not None else open_store(
            settings, spec, group=self.options.group_id, root=self.lakehouse.root)
        self.topic = spec.events.topic
        self.dlq_topic = spec.topics[2]
        self.schema = scored.scored_schema(spec)
        self.state = SpeedState(spec)
        self.owned: set[int] = set()
        self.positions: dict[int, int] = {}  # partition → next offset to consume
        self._partitions = 0  # of the events topic, known at connect
        self._gap_from: dict[int, int] = {}  # partition → first offset lost ("skip" policy)
        self._dlq_sent: list[Any] = []  # this batch's DLQ deliveries, acknowledged before commit
        self._dlq_partitions = 0  # of the DLQ topic, known at the first send
        self._dlq_from: dict[int, int] = {}  # DLQ partition → offset later records land at or after
        self._dlq_done: dict[int, set[int]] = {}  # source partition → offsets already in the DLQ
        self._dlq_pending: dict[int, int] = {}  # assigned partitions whose DLQ is not read yet → resume
        self._flush_due: set[int] = set()  # partitions whose outbox must go to Delta now
        self._paused: set[int] = set()  # floored after the adopted run's cut: wait for the run (`_defer`)
        self._flush_wake = threading.Event()  # set: the flusher runs now (a partition is due, or stop)
        self._flush_failed: BaseException | None = None
        self._outbox = OutboxCopy()  # the outbox rows this member stepped, for the flusher
        # the model service is called from here, overlapping the store's reads (`_Scoring`)
        self._scoring = ThreadPoolExecutor(1, thread_name_prefix="scoring")
        self._pending_run: tuple[BatchRun, PreparedBase] | None = None
        self._loading = False
        self._last_run_check = 0.0
        self._last_lag_report = 0.0
        self._idle_since = time.monotonic()
        self._stop: threading.Event | None = None
        self._consumer: Any = None
        self._producer: Any = None
        self.counts = {"scored": 0, "dlq": 0, "batches": 0, "stale": 0}
        # called after each micro-batch's store step with its rows and the step's wall time (s)
        self.on_commit: Callable[[list[dict[str, Any]], float], None] | None = None
        # called after each Delta append with the rows it wrote and its wall time (s)
        self.on_flush: Callable[[list[dict[str, Any]], float], None] | None = None

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
        self._with_store("connect", self.store.ping)
        self._adopt_newest()
        _spare_the_collector()
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
        self._partitions = len(self._consumer.partitions_for_topic(self.topic) or ())
        self._consumer.subscribe(topics=[self.topic], listener=Listener())
        self._producer = KafkaProducer(**kafka_client_config(self.settings), acks="all", linger_ms=5)

    def _with_store(self, what: str, call: Callable[[], _T]) -> _T:
        """`call` (an online-store operation), waiting while the store cannot be reached:
        nothing of the micro-batch is committed meanwhile. A store that lost state
        (StoreBehindError) is not waited for."""
        delay, down_since = 0.2, None
        while True:
            try:
                result = call()
            except StoreBehindError:
                raise
            except ServiceError as error:
                if self._stop is not None and self._stop.is_set():
                    raise
                if down_since is None:
                    down_since = time.monotonic()
                    metrics.STORE_UP.set(0)
                    log.error(json.dumps({"event": "online_store_unreachable", "during": what,
                                          "error": str(error)}))
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if down_since is not None:
                metrics.STORE_UP.set(1)
                log.info(json.dumps({"event": "online_store_back", "during": what,
                                     "down_s": round(time.monotonic() - down_since, 1)}))
            return result

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
        self._gap_from[partition] = min(wanted, self._gap_from.get(partition, wanted))
        log.error(json.dumps({"event": "offsets_skipped", "partition": partition, "from": wanted,
                              "to": oldest, "records": lost}))
        return oldest

    def _revoke(self, partitions: set[int]) -> None:
        mine = partitions & self.owned
        if not mine:
            return
        self.owned -= mine
        self._idle_since = time.monotonic()
        self._outbox.forget(mine)
        for p in mine:
            self.positions.pop(p, None)
            self._flush_due.discard(p)
            self._paused.discard(p)
        metrics.OWNED_PARTITIONS.set(len(self.owned))
        log.info(json.dumps({"event": "partitions_revoked", "partitions": sorted(mine)}))

    def _assign(self, partitions: set[int]) -> None:
        """Seek the new partitions to what the store applied."""
        from kafka import TopicPartition

        self.owned |= partitions
        self._idle_since = time.monotonic()
        self._outbox.forget(partitions)
        applied = self._with_store("assign", lambda: self.store.applied(sorted(partitions)))
        # Only local calls and the store here: the callback runs inside kafka-python's network
        # loop. A resume offset Kafka no longer holds surfaces in the next poll (`_poll`); the
        # DLQ is read (`_recover_dlq`) and the outbox flushed before any record of these
        # partitions is processed.
        for p in partitions:
            resume = applied[p] + 1
            self._consumer.seek(TopicPartition(self.topic, p), resume)
            self.positions[p] = resume
            self._dlq_pending[p] = resume
            self._flush_due.add(p)
        self._flush_wake.set()
        metrics.OWNED_PARTITIONS.set(len(self.owned))
        log.info(json.dumps({"event": "partitions_assigned", "partitions": sorted(partitions),
                             "resume": {str(p): applied[p] + 1 for p in sorted(partitions)},
                             "batch_run": self.state.base.run_id}))

    # -------------------------------------------------------------- batch handover
    def _adoptable(self, run: BatchRun) -> bool:
        """A run of this spec that cut the online store (its gold ⊕ the epochs after its cut
        is exact)."""
        return run.spec_fingerprint == self.spec.fingerprint() and bool(run.cut_epochs)

    def _prepare(self, run: BatchRun) -> PreparedBase:
        return self.state.prepare(run.run_id, run.boundary, run.cut_epochs,
                                  lake.gold_rows(self.lakehouse, self.spec, run))

    def _adopt_newest(self) -> None:
        run = next((r for r in self._run_log.runs() if self._adoptable(r)), None)
        if run is not None and run.run_id != self.state.base.run_id:
            self.state.install(self._prepare(run))
            metrics.BATCH_RUN.info({"run_id": run.run_id})

    def _check_for_new_run(self) -> None:
        """Every `run_check_s`, look for a newer published run and load it in the background;
        install it between two batches once it is ready."""
        if self._pending_run is not None:
            run, prepared = self._pending_run
            self.state.install(prepared)
            self._pending_run = None
            _spare_the_collector()
            self._resume_deferred()
            metrics.BATCH_RUN.info({"run_id": run.run_id})
            log.info(json.dumps({"event": "batch_run_adopted", "run_id": run.run_id,
                                 "boundary": {str(p): o for p, o in run.boundary.items()},
                                 "cut_epochs": {str(p): e for p, e in run.cut_epochs.items()}}))
            return
        if self._loading or time.monotonic() - self._last_run_check < self.options.run_check_s:
            return
        self._last_run_check = time.monotonic()
        current = self.state.base.run_id

        def load() -> None:  # the look at batch_runs too: the scoring loop never reads Delta
            run = None
            try:
                runs = self._run_log.runs()
                if not runs or runs[0].run_id == current or not self._adoptable(runs[0]):
                    return
                run = runs[0]
                self._pending_run = (run, self._prepare(run))
            except Exception as exc:  # noqa: BLE001 - keep scoring on the current base
                log.error(json.dumps({"event": "batch_run_load_failed",
                                      "run_id": run.run_id if run is not None else None,
                                      "error": f"{type(exc).__name__}: {exc}"}))
            finally:
                self._loading = False

        self._loading = True
        threading.Thread(target=load, name="batch-run-loader", daemon=True).start()

    def _defer(self, partitions: set[int], per_partition: dict[int, list[Any]]) -> None:
        """A newer run's cut floored these partitions (never stepped by the group) over
        offsets that only its views hold: scored on the adopted run, their events would miss
        that history. Leave their records for after that run is adopted (seek back, pause)."""
        from kafka import TopicPartition

        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        for tp in tps:
            first = per_partition[tp.partition][0].offset
            self._consumer.seek(tp, first)
            self.positions[tp.partition] = first
        self._consumer.pause(*tps)
        self._paused |= partitions
        self._last_run_check = 0.0  # look for that run now
        log.warning(json.dumps({"event": "partitions_deferred", "partitions": sorted(partitions),
                                "batch_run": self.state.base.run_id,
                                "why": "a newer batch run floored them; scoring waits until it is adopted"}))

    def _resume_deferred(self) -> None:
        from kafka import TopicPartition

        mine = sorted(self._paused & self.owned)
        if mine:
            self._consumer.resume(*[TopicPartition(self.topic, p) for p in mine])
            log.info(json.dumps({"event": "partitions_resumed", "partitions": mine,
                                 "batch_run": self.state.base.run_id}))
        self._paused.clear()

    # -------------------------------------------------------------- the loop
    def run(self, stop: threading.Event, *, max_events: int | None = None,
            idle_exit_s: float | None = None) -> dict[str, int]:
        """Consume until `stop` is set (SIGTERM), `max_events` records were handled, or
        nothing arrived for `idle_exit_s`; the current batch always completes first, and the
        outbox of the partitions still owned goes to Delta.

        Idle time counts from the last record or the last rebalance. While this member owns
        no partitions (joining, or a killed member not yet timed out of the group) it waits
        two session timeouts longer, so a restart does not give up before its assignment."""
        self._stop = stop
        self._connect()
        self._idle_since = time.monotonic()
        handled = 0
        done = threading.Event()
        flusher = threading.Thread(target=self._flush_loop, args=(done,), name="outbox-flusher", daemon=True)
        flusher.start()
        try:
            while not stop.is_set():
                if self._flush_failed is not None:
                    raise self._flush_failed
                polled = self._poll()
                if self._dlq_pending:
                    pending, self._dlq_pending = self._dlq_pending, {}
                    self._recover_dlq(set(pending), pending)
                self._check_for_new_run()
                records = [r for tp_records in polled.values() for r in tp_records]
                if records:
                    self._idle_since = time.monotonic()
                    self._process(records)
                    handled += len(records)
                self._report_lag()
                if max_events is not None and handled >= max_events:
                    break
                if not records and idle_exit_s is not None and self._idle(idle_exit_s):
                    break
            done.set()
            self._flush_wake.set()
            flusher.join()
            self._flush(self.owned)
        finally:
            done.set()
            self._flush_wake.set()
            self.close()
            self._scoring.shutdown(wait=True)
            self._scoring = ThreadPoolExecutor(1, thread_name_prefix="scoring")  # run may be called again
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
                wanted = self.positions.get(tp.partition, 0)
                if wanted < oldest[tp]:
                    self._consumer.seek(tp, self._missing_offsets(tp.partition, wanted, oldest[tp]))
            return {}

    def _idle(self, idle_exit_s: float) -> bool:
        allowed = idle_exit_s if self.owned else idle_exit_s + 2 * self.options.session_timeout_s
        return time.monotonic() - self._idle_since > allowed

    def _process(self, records: list[Any]) -> None:
        from kafka.structs import OffsetAndMetadata, TopicPartition

        started = time.perf_counter()
        schema = self.spec.events
        per_partition: dict[int, list[Any]] = {}
        for record in records:
            per_partition.setdefault(record.partition, []).append(record)
        parsed: dict[int, list[tuple[Any, dict[str, Any] | None, list[str], str]]] = {}
        identities: dict[int, list[str]] = {}
        valid: list[dict[str, Any]] = []
        for p, recs in per_partition.items():
            recs.sort(key=lambda r: r.offset)
            out = parsed[p] = []
            for record in recs:
                try:
                    event = schema.parse(record.value, key=record.key,
                                         arrival_ms=record.timestamp if record.timestamp >= 0 else None)
                except ValidationError as invalid:
                    out.append((record, None, invalid.reasons, ""))
                    continue
                identity = event_identity(schema, event)
                out.append((record, event, [], identity))
                identities.setdefault(p, []).append(identity)
                valid.append(event)
        phases = _Phases(started)
        phases.done("parse")
        windows = self.state.windows(valid)
        # the states, and (in the same atomic script per partition) the events' identities
        # the store's seen set holds, with their clocks
        read = self._with_store("read", lambda: self.store.read(
            self.state.keys(windows), range(max(self._partitions, max(per_partition) + 1)),
            self.state.base.cut_epochs, identities=identities))
        seen = read.seen  # identity → clock, per partition
        phases.done("read")
        deferred = read.floored & set(parsed)
        if deferred:
            self._defer(deferred, per_partition)
            parsed = {p: items for p, items in parsed.items() if p not in deferred}
        batch = self.state.micro_batch(read.blocks, windows)
        covered = sorted(read.coverage.items())  # a row's coverage: (partition, offset) pairs
        taken: dict[int, list[_Taken]] = {}
        vectors: list[list[float]] = []
        last: dict[int, int] = {}
        dlq = stale = 0
        for p, items in parsed.items():
            applied = read.coverage.get(p, -1)
            clock, known = seen.get(p, (NO_CLOCK, {}))
            rule = Dedup(schema.dedup_horizon_ms, clock=clock, taken=known)
            own = next(i for i, (q, _) in enumerate(covered) if q == p)  # p is read: it is in them
            mine = taken[p] = []
            for record, typed, reasons, identity in items:
                last[p] = record.offset
                self.positions[p] = record.offset + 1
                if record.offset <= applied:  # another member applied it, or a batch run's floor
                    stale += 1
                    continue
                if typed is None:
                    self._to_dlq(record, reasons)
                    dlq += 1
                    continue
                event = typed
                event_clock = rule.judge(identity, record.timestamp)
                if event_clock is None:
                    self._to_dlq(record, [f"duplicate:{schema.id_field}"])
                    dlq += 1
                    continue
                vectors.append(batch.features(event, p))
                batch.add(event, p)
                coverage = covered.copy()  # the event's own partition: its strictly earlier offsets
                coverage[own] = (p, record.offset - 1)
                mine.append(_Taken(record.offset, event, identity, event_clock, {
                    "partition": p, "offset": record.offset,
                    "kafka_timestamp": record.timestamp * 1000 if record.timestamp >= 0 else None,
                    CLOCK: event_clock * 1000, "coverage": coverage}))
        feature_ms = (time.perf_counter() - started) * 1000
        phases.done("features")
        # scored in a thread while the store's steps read what they change: the rows, which
        # carry the scores, are needed only when the steps write (`Step.rows`, `_Scoring`)
        scoring = _Scoring(self._scoring.submit(self._score, vectors), vectors, [t for p in taken for t in taken[p]],
                           {"batch_run_id": self.state.base.run_id, "consumer_group": self.options.group_id,
                            "feature_ms": feature_ms}, schema.time_field)
        if dlq:
            self._await_dlq()
        applied_rows: list[dict[str, Any]] = []
        steps: list[tuple[int, int, int, Callable[[int], Step]]] = []
        chosen_of: dict[int, list[_Taken]] = {}
        stepped_above: dict[int, int] = {}  # partition → the applied offset its step was made above
        for p, mine in taken.items():
            first = min(per_partition[p][0].offset, self._gap_from.pop(p, per_partition[p][0].offset))
            chosen = chosen_of[p] = []

            def step_above(applied: int, p: int = p, mine: list[_Taken] = mine,
                           chosen: list[_Taken] = chosen) -> Step:
                stepped_above[p] = applied
                chosen[:] = [t for t in mine if t.offset > applied]
                # all of them (the rule): the batch's own fold is the increment; else refold
                increments = batch.increments(p) if len(chosen) == len(mine) else \
                    increments_of(self.spec, [t.event for t in chosen])
                return Step(increments, partial(scoring.encoded, chosen),
                            {t.identity: t.clock for t in chosen}, self._homed(p, chosen))

            steps.append((p, first, last[p], step_above))
        try:
            # one round trip for all, starting from what the read saw
            stepped = self._with_store("apply", lambda: self.store.apply_many(steps, basis=read.basis))
            version = scoring.finish()
        except _ScoringFailed as failed:
            raise failed.error from None
        phases.done("step")
        for p, mine in taken.items():
            chosen = chosen_of[p]
            if stepped[p]:
                applied_rows.extend(t.row for t in chosen)
                self._outbox.stepped(p, stepped_above[p], last[p], [t.row for t in chosen])
            else:  # another member applied it: the flusher reads the store's outbox
                self._outbox.forget((p,))
            if len(chosen) < len(mine) or not stepped[p]:
                stale += len(mine) - (len(chosen) if stepped[p] else 0)
        if stale:
            log.info(json.dumps({"event": "stale_rows_skipped", "rows": stale}))
        # where this group's DLQ records of later offsets can start (see `_recover_dlq`); the
        # store decides where a partition resumes, so the commit need not be waited for: one
        # lost (a rebalance, a crash) only makes a successor read a little more of the DLQ
        self._consumer.commit_async({
            TopicPartition(self.topic, p): OffsetAndMetadata(
                o + 1, json.dumps({"dlq_from": self._dlq_from.get(self._dlq_partition(p), 0)}), -1)
            for p, o in last.items()}, callback=_commit_done)
        committed = time.time()
        if self.on_commit is not None:
            self.on_commit(applied_rows, committed)
        now_ms = committed * 1000
        for row in applied_rows:
            if row["kafka_timestamp"] is not None:
                metrics.END_TO_END.observe((now_ms - row["kafka_timestamp"] / 1000) / 1000)
        metrics.EVENTS.labels("scored").inc(len(applied_rows))
        metrics.EVENTS.labels("dlq").inc(dlq)
        metrics.BATCH_SIZE.observe(len(records))
        if applied_rows:
            metrics.MODEL_VERSION.set(version)
        self.counts["scored"] += len(applied_rows)
        self.counts["dlq"] += dlq
        self.counts["stale"] += stale
        self.counts["batches"] += 1

    # -------------------------------------------------------------- the outbox → Delta
    def _flush_loop(self, done: threading.Event) -> None:
        """The outbox → Delta, off the scoring loop (its own thread): every `flush_s` the
        partitions owned, at once those just assigned. A failure stops the layer (the loop
        raises it) with nothing lost: the rows stay in the outbox."""
        try:
            while not done.is_set():
                self._flush_wake.wait(self.options.flush_s)
                self._flush_wake.clear()
                if done.is_set():
                    return
                due, self._flush_due = self._flush_due, set()
                self._flush(set(self.owned) if not due else due & set(self.owned))
        except BaseException as exc:  # noqa: BLE001 - handed to the scoring loop, which raises it
            self._flush_failed = exc

    def _flush(self, partitions: set[int]) -> None:
        """Append the outbox rows of `partitions` to scored_events in one commit, whose app
        transactions record the store's applied offsets; then drop them from the outbox.
        Rows Delta already holds (a flush that died before its outbox trim) are left out."""
        rows: list[dict[str, Any]] = []
        through: dict[int, int] = {}
        for p in sorted(partitions):
            copy = self._outbox.take(p)
            if copy is not None:
                applied, held = copy
            else:
                applied, pending = self._with_store("flush", lambda p=p: self.store.pending(p))  # type: ignore[misc]
                held = [decode_row(raw) for raw in pending]
                self._outbox.read(p, applied)
            if applied < 0:
                continue
            through[p] = applied
            rows.extend(held)
        if not through:
            return
        started = time.perf_counter()
        try:
            written = lake.append_scored(self.lakehouse, self.schema, rows, through,
                                         group=self.options.group_id, topic=self.topic)
        except BaseException:
            self._outbox.forget(through)  # the rows taken stay in the store's outbox: read them there
            raise
        metrics.FLUSH_LATENCY.observe(time.perf_counter() - started)
        for p, applied in through.items():
            self._with_store("flush", lambda p=p, applied=applied: self.store.flushed(p, applied))  # type: ignore[misc]
        if self.on_flush is not None and written:
            self.on_flush(rows, time.time())

    def _homed(self, partition: int, taken: list[_Taken]) -> int:
        """`Step.homed`: the topic's partition count if every event taken lies in its key
        entity's home partition (Kafka's default partitioner), else 0."""
        count, key = self._partitions, self.spec.events.key_field
        if count and all(isinstance(entity := t.event[key], str) and home_partition(entity, count) == partition
                         for t in taken):
            return count
        return 0

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
        for p in sorted(self.owned):
            # the high-water mark the last fetch response carried: no round trip to the broker
            # in the scoring loop (None until a fetch of the partition returned)
            end = self._consumer.highwater(TopicPartition(self.topic, p))
            if end is not None:
                metrics.LAG.labels(str(p)).set(end - self.positions.get(p, 0))

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
            self._consumer = None
        if self._producer is not None:
            self._producer.flush()
            self._producer.close()
            self._producer = None


class _Phases:
    """Times the phases of one micro-batch into `metrics.BATCH_PHASE`."""

    def __init__(self, started: float) -> None:
        self._at = started

    def done(self, phase: str) -> None:
        now = time.perf_counter()
        metrics.BATCH_PHASE.labels(phase).observe(now - self._at)
        self._at = now


class _ScoringFailed(Exception):  # noqa: N818 - carries the model service's error past `_with_store`
    """The model service failed while the store's steps waited for their rows."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _Scoring:
    """One micro-batch's scoring, running in the scoring thread: `finish` waits for it once
    and completes the taken events' rows with their scores; `encoded` gives some of those
    rows for the outbox (what a `Step` writes)."""

    def __init__(self, future: Future[tuple[list[float], int, float]], vectors: list[list[float]],
                 taken: list[_Taken], common: dict[str, Any], time_field: str) -> None:
        self._future, self._vectors, self._taken = future, vectors, taken
        self._common, self._time_field = common, time_field
        self._version: int | None = None

    def finish(self) -> int:
        """The model version (after the rows are complete); `_ScoringFailed` if scoring failed."""
        if self._version is not None:
            return self._version
        try:
            scores, version, model_ms = self._future.result()
        except Exception as error:  # noqa: BLE001 - the model service's failure, raised by the loop
            raise _ScoringFailed(error) from error
        scored_at = int(time.time() * 1_000_000)
        time_field, common = self._time_field, self._common
        per_event_ms = common["feature_ms"] / max(1, len(self._taken))
        for item, vector, score in zip(self._taken, self._vectors, scores, strict=True):
            item.row = {**item.event, time_field: item.event[time_field] * 1000, **item.row,
                        "features": vector, "score": score, "model_version": version,
                        "batch_run_id": common["batch_run_id"], "consumer_group": common["consumer_group"],
                        "scored_at": scored_at, "feature_ms": per_event_ms, "model_ms": model_ms}
        self._version = version
        return version

    def encoded(self, taken: list[_Taken]) -> dict[int, bytes]:
        self.finish()
        return {t.offset: encode_row(t.row) for t in taken}


def _commit_done(offsets: Any, result: Any) -> None:
    if isinstance(result, Exception):  # e.g. the group rebalanced while the batch ran
        log.warning(json.dumps({"event": "offset_commit_refused",
                                "partitions": sorted(tp.partition for tp in offsets),
                                "error": f"{type(result).__name__}: {result}",
                                "why": "the online store decides where each partition resumes"}))


def _spare_the_collector() -> None:
    """Keep Python's cyclic garbage collector off the long-lived objects (the adopted run's
    gold states, the clients): move them to the permanent generation, so that the full
    collections a micro-batch's allocations trigger scan what the micro-batch made, not the
    views. The states of a run replaced later are then freed by reference counting only
    (they hold no cycles)."""
    gc.collect()
    gc.freeze()


class OutboxCopy:
    """This member's copy of the store's outbox, per partition: the rows it stepped since the
    flusher last took them. A partition's copy is complete from a flush that read the store's
    outbox while no step of this member was in between (`read`) until a step of the
    partition was made above an applied offset other than this member's last (another
    member stepped it: `stepped`), or the partition was revoked or assigned (`forget`).
    Where it is not complete, `take` says so (None) and the flusher reads the store.
    Thread-safe: the scoring loop steps, the flusher takes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[int, list[dict[str, Any]] | None] = {}  # None: not known to be complete
        self._last: dict[int, int] = {}  # partition → the applied offset of this member's last step

    def stepped(self, partition: int, above: int, last: int, rows: list[dict[str, Any]]) -> None:
        """This member's step of `partition`, made above applied offset `above`, through `last`."""
        with self._lock:
            held = self._rows.get(partition)
            if held is not None and self._last.get(partition) == above:
                held.extend(rows)
            else:
                self._rows[partition] = None
            self._last[partition] = last

    def take(self, partition: int) -> tuple[int, list[dict[str, Any]]] | None:
        """(the store's applied offset, the outbox's rows) when the copy is complete, emptied."""
        with self._lock:
            held = self._rows.get(partition)
            if held is None:
                return None
            self._rows[partition] = []
            return self._last[partition], held

    def read(self, partition: int, applied: int) -> None:
        """The flusher read the store's outbox through `applied` (and takes it all): the copy
        is complete from here if this member made no step above `applied` meanwhile."""
        with self._lock:
            if self._last.get(partition, applied) == applied:
                self._rows[partition], self._last[partition] = [], applied

    def forget(self, partitions: Iterable[int]) -> None:
        with self._lock:
            for p in partitions:
                self._rows.pop(p, None)
                self._last.pop(p, None)


def encode_row(row: dict[str, Any]) -> bytes:
    """A scored row for the outbox: JSON (msgspec: floats round-trip exactly), timestamps as
    epoch microseconds. A row's coverage is its (partition, offset) pairs in partition order
    (the Arrow map's form), so the row is written as it is, and read back equal
    (`decode_row`): the member's copy of the outbox holds the rows themselves."""
    return _ENCODE(row)


def decode_row(raw: bytes) -> dict[str, Any]:
    row: dict[str, Any] = _DECODE(raw)
    coverage = row["coverage"]
    # a row an older version wrote holds its coverage as an object keyed by partition
    row["coverage"] = sorted((int(p), o) for p, o in coverage.items()) if isinstance(coverage, dict) \
        else [(p, o) for p, o in coverage]
    return row


_ENCODE = msgspec.json.Encoder().encode
_DECODE = msgspec.json.Decoder().decode
