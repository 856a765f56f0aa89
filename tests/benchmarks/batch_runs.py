"""Reading the published batch runs at two uptimes: what serving's refresh (four times a
second) and the speed layer's look for a newer run cost as runs accumulate. Compares opening
batch_runs and decoding every run (`published_runs`, what each look did before) with a
`RunLog` kept open: a look that finds nothing new, and one that finds a run just published;
and what publishing one more run costs.
Needs no services (a local Delta table). Run:

    .venv/bin/python -m tests.benchmarks.batch_runs --sizes 10 300
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from lakehouse.tables import BatchRun, Lakehouse, RunLog, publish_run, published_runs


def publish(lakehouse: Lakehouse, i: int) -> None:
    publish_run(lakehouse, BatchRun(
        run_id=f"run-{i}", boundary={0: i, 1: i}, cut_epochs={0: i + 1, 1: i + 1}, view_versions={"v": i},
        source_versions={"silver": i}, row_counts={"v": 1}, durations_s={"v": 0.1}, spec_fingerprint="bench",
        finished_at=datetime.now(UTC)))


def ms(look: Callable[[], Any], repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        look()
    return (time.perf_counter() - started) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 300], help="published runs")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    lakehouse = Lakehouse(tempfile.mkdtemp(prefix="batch-runs-"))
    log = RunLog(lakehouse)
    published = 0
    rows = []
    for size in sorted(args.sizes):
        started = time.monotonic()
        while published < size - 1:
            publish(lakehouse, published)
            published += 1
            if published % 50 == 0:
                print(f"  {published} runs published ({time.monotonic() - started:.0f} s)", flush=True)
        log.runs()
        started = time.perf_counter()
        publish(lakehouse, published)  # the newest: the log's next look finds it
        publishing = (time.perf_counter() - started) * 1000
        published += 1
        started = time.perf_counter()
        assert log.runs()[0].run_id == f"run-{size - 1}"
        new_run = (time.perf_counter() - started) * 1000
        rows.append((size, ms(lambda: published_runs(lakehouse), args.repeats),
                     ms(log.runs, args.repeats * 10), new_run, publishing))
    print(f"{'runs':>6}  {'open + decode all':>18}  {'RunLog, nothing new':>20}  {'RunLog, one new run':>20}"
          f"  {'publishing a run':>17}")
    for size, full, idle, new_run, publishing in rows:
        print(f"{size:>6}  {full:>15.1f} ms  {idle:>17.2f} ms  {new_run:>17.1f} ms  {publishing:>14.1f} ms")
    (small, *_), (large, *_) = rows[0], rows[-1]
    print(f"t(large)/t(small) at {large} vs {small} runs: open + decode {rows[-1][1] / rows[0][1]:.2f}×, "
          f"RunLog nothing new {rows[-1][2] / rows[0][2]:.2f}×, one new run {rows[-1][3] / rows[0][3]:.2f}×, "
          f"publishing {rows[-1][4] / rows[0][4]:.2f}×")


if __name__ == "__main__":
    main()
