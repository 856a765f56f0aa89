"""Restart benchmark (issue 13), on a running platform (`lambdalake up`, default ports) with a
model service: how long a speed member takes from its process start until it has scored a
new event, and its memory then, after 10,000 and after 1,000,000 scored events of history.
The goal: neither grows with the history (a restart reads the store's applied offsets, not
the scored history).

For each size N, on a fresh topic, lakehouse and consumer group:
1. N generated transactions (no malformed records, no duplicates: every one is an event the
   speed layer scores) are produced to Kafka as fast as it takes them, with Kafka timestamps
   spread as the generator's send times are (they end just before now), so the partitions'
   clocks and the seen sets look like a long uptime's, not like one burst of N events;
2. the store is brought to "N events scored", by default (`--fill store`) straight through
   `OnlineStore.apply`: the topic read back, one step per partition and 200 records (the
   typed events' increments, their scored rows in the outbox and their identities with
   their clocks, `lakehouse.dedup`), the outbox appended to `speed/scored_events` every
   `--flush-every` rows with the app transactions the speed layer writes (so the history
   really exists in Delta) and then trimmed (`flushed`), and the group's Kafka offsets
   committed at the end, as a member would have left them. Scored rows carry placeholder
   features and scores (a restart never reads them). `--fill speed` runs the real speed
   layer (`lambdalake speed run`, its own process) over the N events instead and stops it
   with SIGTERM once the store applied them all and its outbox is in Delta: measured about
   1,000 events/s after a ~20 s start-up on 2 busy cores (1M: ~17 min), so it is the check
   at small sizes that the synthetic history restarts like a real one;
3. the restart, `--repeats` times per size (the sizes taking turns, after one unreported
   warm-up restart): one probe event (a new user) is produced, `lambdalake speed
   run` starts for the topic and group (as `tests/integration/streams.py` `speed_process`
   starts it, its output in a log file), and the time from the process start until the
   store's applied offset of the probe's partition reaches the probe's offset (its step is
   visible: serving reads it from then on) is measured, and when Kafka assigned it the
   partitions (its log), which splits the constant start-up (imports, Ray, the group join)
   from what follows; then the member's RSS (with any child processes), and it is stopped
   with SIGTERM.

The model service is a random signed model registered under a fresh name (`--model-name`
to choose one: a champion trained on an older spec would be refused by the service).
Filling 1M events through the store takes about 10 minutes here. The members' logs are kept
in var/logs/bench-restart/<topic suffix>/. Prints each size and then both side by side with
t(largest)/t(smallest) and the RSS ratio. Run:

    .venv/bin/python -m tests.benchmarks.restart                 # 10,000 and 1,000,000
    .venv/bin/python -m tests.benchmarks.restart --sizes 2000 20000 --repeats 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from lakehouse.serve import ray_local_env

os.environ.update(ray_local_env())  # before Ray is imported

import psutil  # noqa: E402

from lakehouse.config import Settings, load_settings  # noqa: E402
from lakehouse.dedup import CLOCK, NO_CLOCK, record_clock  # noqa: E402
from lakehouse.fraud import TRANSACTIONS  # noqa: E402
from lakehouse.generator import GeneratorOptions, generate  # noqa: E402
from lakehouse.online import open_store  # noqa: E402
from lakehouse.online.base import OnlineStore, Step, event_identity, increments_of  # noqa: E402
from lakehouse.scored import ensure_scored_table, scored_schema  # noqa: E402
from lakehouse.streams import ensure_topics, kafka_client_config, producer  # noqa: E402
from lakehouse.tables import Lakehouse  # noqa: E402
from speed import lake  # noqa: E402
from speed.consumer import encode_row  # noqa: E402
from tests.benchmarks.speed_layer import serve_model  # noqa: E402
from tests.integration.streams import discard, spec_on  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PER_STEP = 200  # records of one partition per store step (the members run with --max-batch 200)


@dataclasses.dataclass
class History:
    """One size's topic, lakehouse, group and store, and what was produced to the topic."""

    settings: Settings
    spec: Any
    topic: str
    lakehouse: Lakehouse
    group: str
    store: OnlineStore
    ends: dict[int, int]  # partition → the last offset produced
    last_ms: int  # the last Kafka timestamp produced
    template: dict[str, Any]  # a valid event, for the probes
    logs: Path

    def member(self, log_name: str) -> subprocess.Popen[bytes]:
        """`lambdalake speed run` for the topic and group, as its own process."""
        out = (self.logs / log_name).open("wb")
        env = {**os.environ, "LAMBDALAKE_DELTA_ROOT": self.lakehouse.root,
               "LAMBDALAKE_MODEL_NAME": self.settings.model_name}
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "lambdalake"), "speed", "run", "--topic", self.topic,
             "--group", self.group, "--max-batch", "200"],
            env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def produce_history(settings: Settings, n: int, seed: int) -> History:
    """A fresh topic with n generated transactions (Kafka timestamps: the generator's send
    times, shifted to end before now)."""
    from tests.integration.streams import last_offsets

    suffix = uuid.uuid4().hex[:8]
    topic = f"restart-{suffix}"
    ensure_topics(settings.kafka_bootstrap_servers, [topic, f"{topic}.dlq"], partitions=settings.kafka_partitions)
    spec = spec_on(topic)
    lakehouse = Lakehouse(f"{settings.delta_uri}/restart-{suffix}")
    group = f"restart-{suffix}"
    options = GeneratorOptions(events=n, seed=seed, malformed_fraction=0, duplicate_fraction=0)
    now_ms = int(time.time() * 1000)
    base_ms = now_ms - int(n * options.gap_ms * 1.2) - 3_600_000
    kafka = producer(settings)
    failures: list[BaseException] = []
    started = time.monotonic()
    produced, last_ms, template = 0, 0, b""
    for m in generate(options):
        if m.topic != TRANSACTIONS.topic:
            continue
        timestamp = min(now_ms, base_ms + m.sent_ms - options.start_ms)
        kafka.send(topic, key=m.key, value=m.value, timestamp_ms=timestamp).add_errback(failures.append)
        produced, last_ms, template = produced + 1, max(last_ms, timestamp), m.value
    kafka.flush(timeout=300)
    kafka.close()
    if failures:
        raise SystemExit(f"Kafka refused {len(failures)} records: {failures[0]!r}")
    ends = last_offsets(settings, topic)
    held = sum(o + 1 for o in ends.values())
    if held != produced:
        raise SystemExit(f"topic {topic} holds {held} records, {produced} were produced")
    print(f"{n:>10,} events: produced to {topic} in {time.monotonic() - started:.1f}s", flush=True)
    logs = Path(settings.state_path) / "logs" / "bench-restart" / suffix
    logs.mkdir(parents=True, exist_ok=True)
    store = open_store(settings, spec, group=group, root=lakehouse.root)
    return History(settings, spec, topic, lakehouse, group, store, ends, last_ms, json.loads(template), logs)


def fill_store(h: History, flush_every: int) -> None:
    """The store (and speed/scored_events, and the group's offsets) as after a speed member
    scored every record of the topic (see the module docstring)."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    schema = h.spec.events
    time_field = schema.time_field
    arrow_schema = scored_schema(h.spec)
    ensure_scored_table(h.lakehouse, arrow_schema)
    features = [0.0] * len(h.spec.feature_names)
    applied = {p: -1 for p in h.ends}
    clocks = {p: NO_CLOCK for p in h.ends}
    scored_at = int(time.time() * 1_000_000)
    rows: list[dict[str, Any]] = []

    def step(p: int, records: list[Any]) -> None:
        taken = []
        for r in records:
            event = schema.parse(r.value, key=r.key, arrival_ms=r.timestamp)
            clock = clocks[p] = record_clock(clocks[p], r.timestamp)
            taken.append((r.offset, event, event_identity(schema, event), clock, {
                **event, time_field: event[time_field] * 1000, "partition": p, "offset": r.offset,
                "kafka_timestamp": r.timestamp * 1000, CLOCK: clock * 1000, "features": features,
                "coverage": sorted({**applied, p: r.offset - 1}.items()), "score": 0.5, "model_version": 1,
                "batch_run_id": None, "consumer_group": h.group, "scored_at": scored_at,
                "feature_ms": 0.05, "model_ms": 1.0}))

        def above(at: int) -> Step:
            mine = [t for t in taken if t[0] > at]
            return Step(increments_of(h.spec, [t[1] for t in mine]), {t[0]: encode_row(t[4]) for t in mine},
                        {t[2]: t[3] for t in mine})

        h.store.apply(p, records[0].offset, records[-1].offset, above)
        applied[p] = records[-1].offset
        rows.extend(t[4] for t in taken)

    def flush() -> None:
        through = {p: o for p, o in applied.items() if o >= 0}
        lake.append_scored(h.lakehouse, arrow_schema, rows, through, group=h.group, topic=h.topic)
        for p, o in through.items():
            h.store.flushed(p, o)
        rows.clear()

    started = time.monotonic()
    consumer = KafkaConsumer(**kafka_client_config(h.settings), enable_auto_commit=False,
                             max_partition_fetch_bytes=4 * 1024 * 1024)
    partitions = [TopicPartition(h.topic, p) for p in sorted(h.ends)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    buffers: dict[int, list[Any]] = {p: [] for p in h.ends}
    deadline = time.monotonic() + 3600
    while any(applied[p] < h.ends[p] for p in h.ends):
        if time.monotonic() > deadline:
            raise SystemExit(f"topic {h.topic} could not be read to its end")
        for tp, records in consumer.poll(timeout_ms=1000, max_records=5000).items():
            buffers[tp.partition].extend(records)
        for p, buffer in buffers.items():
            while len(buffer) >= PER_STEP or (buffer and buffer[-1].offset == h.ends[p]):
                chunk, buffer[:] = buffer[:PER_STEP], buffer[PER_STEP:]
                step(p, chunk)
        if len(rows) >= flush_every:
            flush()
    flush()
    consumer.close()
    committer = KafkaConsumer(**kafka_client_config(h.settings), group_id=h.group, enable_auto_commit=False)
    committer.assign(partitions)
    committer.commit({tp: OffsetAndMetadata(applied[tp.partition] + 1, json.dumps({"dlq_from": 0}), -1)
                      for tp in partitions if applied[tp.partition] >= 0})
    committer.close()
    events = sum(o + 1 for o in applied.values())
    print(f"{events:>10,} events: applied to the store and written to speed/scored_events in "
          f"{time.monotonic() - started:.1f}s ({events / PER_STEP:,.0f}+ steps, a Delta commit every "
          f"{flush_every:,} rows)", flush=True)


def caught_up(h: History) -> bool:
    """The store applied every record produced, and its outbox is in Delta."""
    return h.store.applied(sorted(h.ends)) == h.ends and all(not h.store.pending(p)[1] for p in h.ends)


def wait_while_running(member: Any, done: Any, timeout_s: float, log: Path, what: str,
                       every_s: float = 0.01) -> None:
    """Until `done()`, asked every `every_s`; SystemExit if the member exits or `timeout_s`
    passes first."""
    started = time.monotonic()
    while not done():
        if member.poll() is not None:
            raise SystemExit(f"the speed layer exited with {member.returncode}; see {log}")
        if time.monotonic() - started > timeout_s:
            raise SystemExit(f"{what} in {timeout_s:.0f}s; see {log}")
        time.sleep(every_s)


def fill_speed(h: History, timeout_s: float) -> None:
    """The real speed layer over every record of the topic, stopped once it caught up."""
    started = time.monotonic()
    member = h.member("fill.log")
    try:
        wait_while_running(member, lambda: caught_up(h), timeout_s, h.logs / "fill.log",
                           "the speed layer did not catch up", every_s=0.5)
        elapsed = time.monotonic() - started
    finally:
        member.send_signal(signal.SIGTERM)
        member.wait(timeout=120)
    events = sum(o + 1 for o in h.ends.values())
    print(f"{events:>10,} events: scored by the speed layer in {elapsed:.1f}s incl. its start-up "
          f"({events / elapsed:,.0f} events/s)", flush=True)


def rss(pid: int) -> int:
    """Resident memory of a process and its descendants, bytes."""
    process = psutil.Process(pid)
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return int(total)


def assigned_after(log: Path, started: float) -> float:
    """Seconds from `started` (epoch s) to the member's first `partitions_assigned` log line
    (nan if none)."""
    for line in log.read_text(errors="replace").splitlines():
        if '"partitions_assigned"' in line:
            try:
                return datetime.fromisoformat(json.loads(line)["ts"]).timestamp() - started
            except (ValueError, KeyError):
                continue
    return float("nan")


def restart(h: History, name: str, timeout_s: float = 300.0) -> tuple[float, int, float]:
    """(seconds from the member's start until the probe's step is in the store, its RSS,
    seconds from its start until Kafka assigned it the partitions)."""
    user = f"probe-{uuid.uuid4().hex[:10]}"
    h.last_ms += 1000
    event = {**h.template, "event_id": f"probe-{uuid.uuid4().hex[:10]}", "user_id": user}
    kafka = producer(h.settings)
    placed = kafka.send(h.topic, key=user.encode(), value=json.dumps(event).encode(),
                        timestamp_ms=h.last_ms).get(timeout=60)
    kafka.close()
    partition, offset = placed.partition, placed.offset
    h.ends[partition] = offset
    started, wall = time.monotonic(), time.time()
    log = h.logs / f"restart-{name}.log"
    member = h.member(log.name)
    try:
        wait_while_running(member, lambda: h.store.applied([partition])[partition] >= offset, timeout_s, log,
                           "the probe was not applied")
        elapsed = time.monotonic() - started
        memory = rss(member.pid)
    finally:
        member.send_signal(signal.SIGTERM)
        member.wait(timeout=120)
    return elapsed, memory, assigned_after(log, wall)


def cleanup(h: History) -> None:
    discard(h.settings, h.topic, h.lakehouse.root, h.store)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000], help="scored events")
    parser.add_argument("--fill", choices=("store", "speed"), default="store",
                        help="how the history gets scored: store steps (default) or the real speed layer")
    parser.add_argument("--repeats", type=int, default=5, help="restarts per size (the median is reported)")
    parser.add_argument("--flush-every", type=int, default=2000,
                        help="--fill store: scored rows per Delta commit (the speed layer commits ~1/s)")
    parser.add_argument("--keep", action="store_true", help="keep the topics, lakehouses and stores")
    parser.add_argument("--model-name", default=None,
                        help="the registered model to serve (default: a fresh bench-restart-* with a random "
                             "signed model of the running spec: a champion of an older spec would be refused)")
    args = parser.parse_args()
    settings = load_settings()
    settings = settings.model_copy(update={"model_name": args.model_name or f"bench-restart-{uuid.uuid4().hex[:6]}"})
    serve_model(settings)
    results: dict[int, tuple[list[float], list[int], list[float]]] = {n: ([], [], []) for n in args.sizes}
    histories: dict[int, History] = {}
    try:
        for n in args.sizes:
            h = histories[n] = produce_history(settings, n, seed=11)
            if args.fill == "store":
                fill_store(h, args.flush_every)
            else:
                fill_speed(h, timeout_s=max(600.0, n / 200))
            if not caught_up(h):
                raise SystemExit("the store does not hold every record produced")
        # one restart first, not reported (the first member after a deploy starts slower);
        # then the sizes take turns, so the machine's drift does not favour one of them
        seconds, _, _ = restart(histories[args.sizes[0]], "warmup")
        print(f"warm-up restart ({args.sizes[0]:,} events, not reported): {seconds:.2f}s", flush=True)
        for attempt in range(args.repeats):
            for n, h in histories.items():
                seconds, resident, assigned = restart(h, str(attempt))
                times, memory, assignments = results[n]
                times.append(seconds)
                memory.append(resident)
                assignments.append(assigned)
                print(f"{n:>10,} events: restart {attempt + 1}: probe applied {seconds:.2f}s after the "
                      f"process start (partitions assigned after {assigned:.2f}s); RSS "
                      f"{resident / 2**20:.0f} MiB", flush=True)
    finally:
        for h in histories.values():
            if not args.keep:
                cleanup(h)
            else:
                print(f"kept: topic {h.topic}, lakehouse {h.lakehouse.root}, group {h.group}")
    print()
    print(f"restart of a speed member (fill: {args.fill}; median of {args.repeats}):")
    print(f"{'scored events':>14} {'start → probe applied':>22} {'of which → assigned':>20} "
          f"{'assigned → applied':>19} {'RSS after the probe':>20}")
    medians = {}
    for n, (times, memory, assignments) in results.items():
        after = [t - a for t, a in zip(times, assignments, strict=True)]
        medians[n] = (statistics.median(times), statistics.median(memory), statistics.median(after))
        print(f"{n:>14,} {medians[n][0]:>20.2f} s {statistics.median(assignments):>18.2f} s "
              f"{medians[n][2]:>17.2f} s {medians[n][1] / 2**20:>16.0f} MiB")
    if len(results) >= 2:
        small, large = min(results), max(results)
        t, m, a = (medians[large][i] / medians[small][i] for i in range(3))
        print(f"t({large:,}) / t({small:,}) = {t:.2f} (assigned → applied: {a:.2f}); "
              f"RSS({large:,}) / RSS({small:,}) = {m:.2f} (the goal: about 1)")


if __name__ == "__main__":
    main()
