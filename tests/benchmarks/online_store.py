"""Refresh cost against uptime: the online store next to today's Delta hand-off.

The same events arrive in 100 and in 2,000 micro-batches (one partition, 1,000 users). For
each size, side by side in one run:

- Delta (today's path): every micro-batch is one append to a scored-events-like table; a
  serving refresh lists the table's files (`to_pyarrow_dataset().get_fragments()`), so its
  cost follows the number of micro-batches since the table began.
- Online store: every micro-batch is one `apply` step (exactly once, per partition); a
  refresh is one `scan` of the epochs after the cut, whose cost follows the number of live
  (entity, bucket) states, not how many steps built them.

Also: the time of one step and of one point read (`read`, what /v1/entities will use), and
the seen set's memory at two uptimes (`--seen-events`, events at `--rate` per second of
Kafka time, the spec's dedup horizon): with the horizon it holds one horizon of events.

    .venv/bin/python -m tests.benchmarks.online_store [--events 20000] [--sizes 100 2000] \
        [--seen-events 1200000 4800000 --rate 2000]

Needs `redis-server` (installed by `make install`); starts its own on a free port, as the
platform runs it (`infra.redis`).
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

from infra.redis import RedisService
from lakehouse.config import load_settings
from lakehouse.fraud import FRAUD_SPEC
from lakehouse.online.base import Step, increments_of
from lakehouse.online.redis_store import RedisOnlineStore

SPEC = FRAUD_SPEC
TIME = SPEC.events.time_field


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _events(n: int, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    start = 1_767_225_600_000
    return [{"event_id": f"e{i}", "user_id": f"u{rng.randrange(1000)}", "merchant_id": f"m{rng.randrange(200)}",
             "merchant_category": "grocery", "amount": rng.randrange(100, 100_000), "currency": "EUR",
             "country": "DE", "channel": "pos", TIME: start + i * 50} for i in range(n)]


def _timed(action: Any, repeat: int = 5) -> float:
    """Median seconds of `action()`."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _delta(folder: Path, batches: list[list[dict[str, Any]]]) -> tuple[float, float]:
    """(seconds per append, seconds per refresh listing) of one Delta table."""
    path = str(folder / "scored")
    schema = pa.schema([("offset", pa.int64()), ("user_id", pa.string()), ("amount", pa.int64())])
    offset, started = 0, time.perf_counter()
    for batch in batches:
        rows = [{"offset": offset + i, "user_id": e["user_id"], "amount": e["amount"]} for i, e in enumerate(batch)]
        offset += len(batch)
        write_deltalake(path, pa.Table.from_pylist(rows, schema=schema), mode="append")
    per_append = (time.perf_counter() - started) / len(batches)
    return per_append, _timed(lambda: list(DeltaTable(path).to_pyarrow_dataset().get_fragments()))


def _store(url: str, group: str, batches: list[list[dict[str, Any]]]) -> tuple[float, float, float, int]:
    """(seconds per step, seconds per scan, seconds per point read, live states) of the store."""
    store = RedisOnlineStore(SPEC, group, url)
    store.wipe()
    offset, started = 0, time.perf_counter()
    for batch in batches:
        first, last = offset, offset + len(batch) - 1
        offset += len(batch)
        store.apply(0, first, last, lambda applied, batch=batch, first=first: Step(increments_of(
            SPEC, [e for i, e in enumerate(batch) if first + i > applied]), {}, {}))
    per_step = (time.perf_counter() - started) / len(batches)
    states = sum(1 for _ in store.scan(0, 0)[1])
    scan = _timed(lambda: list(store.scan(0, 0)[1]))
    keys = [(view.name, "u1" if view.entity == "user_id" else "m1", view.bucket_of(batches[-1][-1][TIME]))
            for view in SPEC.views]
    point = _timed(lambda: store.read(keys, [0], {}), repeat=50)
    return per_step, scan, point, states


def _seen_set(url: str, events: int, rate: float) -> tuple[int, int, float]:
    """(identities held, bytes of the seen set, seconds) after `events` taken at `rate` per
    second of Kafka time, in steps of 500 on one partition (identities only: no states)."""
    store = RedisOnlineStore(FRAUD_SPEC, f"bench-seen-{events}", url)
    store.wipe()
    started = time.perf_counter()
    per_step, t0 = 500, 1_767_225_600_000
    for first in range(0, events, per_step):
        seen = {f'["u{i % 50_000}","e{i}"]': t0 + int(i * 1000 / rate)
                for i in range(first, min(events, first + per_step))}
        store.apply(0, first, first + len(seen) - 1, lambda applied, seen=seen: Step({}, {}, seen))
    elapsed = time.perf_counter() - started
    key = store._seen(0)
    held, size = int(store.client.zcard(key)), int(store.client.memory_usage(key, samples=0) or 0)
    store.wipe()
    return held, size, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 2_000], help="micro-batches")
    parser.add_argument("--seen-events", type=int, nargs="*", default=[1_200_000, 4_800_000],
                        help="events taken, for the seen set's memory (none: skip)")
    parser.add_argument("--rate", type=float, default=2000.0, help="events per second of Kafka time")
    args = parser.parse_args()
    seen_rows = []
    with tempfile.TemporaryDirectory(prefix="lambdalake-bench-") as scratch:
        server = RedisService(load_settings(state_dir=Path(scratch) / "state", redis_port=_free_port()))
        server.start()
        try:
            server.wait_ready()
            url = server.url
            events = _events(args.events)
            rows = []
            for size in args.sizes:
                per = max(1, len(events) // size)
                batches = [events[i:i + per] for i in range(0, len(events), per)][:size]
                print(f"{len(batches):>6} micro-batches of {per} events: Delta …", flush=True)
                append, listing = _delta(Path(scratch) / f"delta-{size}", batches)
                print(f"{len(batches):>6} micro-batches of {per} events: store …", flush=True)
                step, scan, point, states = _store(url, f"bench-{size}", batches)
                rows.append((len(batches), append, listing, step, scan, point, states))
            for n in args.seen_events:
                print(f"seen set after {n:,} events …", flush=True)
                seen_rows.append((n, *_seen_set(url, n, args.rate)))
        finally:
            server.stop()
    print()
    print(f"{'batches':>8} {'Delta append':>13} {'Delta refresh':>14} {'store step':>11} {'store scan':>11} "
          f"{'point read':>11} {'live states':>12}")
    for n, append, listing, step, scan, point, states in rows:
        print(f"{n:>8} {append * 1000:>10.2f} ms {listing * 1000:>11.2f} ms {step * 1000:>8.2f} ms "
              f"{scan * 1000:>8.2f} ms {point * 1000:>8.3f} ms {states:>12}")
    if len(rows) >= 2:
        (small, *_, large) = rows
        print(f"\nrefresh cost, {large[0]} vs {small[0]} micro-batches: Delta listing ×{large[2] / small[2]:.1f}, "
              f"store scan ×{large[4] / small[4]:.2f}")
    horizon = FRAUD_SPEC.events.dedup_horizon_ms
    for n, held, size, elapsed in seen_rows:
        print(f"seen set after {n:>10,} events ({n / args.rate / 60:.0f} min at {args.rate:,.0f}/s, horizon "
              f"{horizon / 60_000 if horizon else float('inf'):.0f} min): {held:>9,} identities, "
              f"{size / 2**20:7.1f} MiB ({size / max(held, 1):.0f} B each); {n / elapsed:,.0f} identities/s applied")
    if len(seen_rows) >= 2:
        print(f"seen set memory, {seen_rows[-1][0]:,} vs {seen_rows[0][0]:,} events: "
              f"×{seen_rows[-1][2] / max(seen_rows[0][2], 1):.2f}")


if __name__ == "__main__":
    main()
