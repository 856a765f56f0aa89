"""Issue 13's figures in one run: the benchmarks below, one after the other, each as its own
process (its whole output in a log file), then a short summary of each.

- freshness: `tests.benchmarks.freshness --rate 2000` (produce → /v1/entities and → SQL
  while a background stream runs);
- serving: `tests.benchmarks.serving` (the refresh cost at 100 vs 10,000 micro-batches, and
  what else that script measures; `--serving-args` passes its options, by default
  `--skip-http`: the engine figures);
- restart: `tests.benchmarks.restart` (a speed member's restart at 10,000 vs 1,000,000
  scored events);
- training: `tests.benchmarks.batch_layer --sizes 1000000 --no-train` (the training set as
  of each scored event's coverage vector, next to the views on the same data).

Needs the running platform (`lambdalake up`). The freshness part serves a random signed model
registered under a fresh name (`--model-name`), so a champion trained on an older spec in
the registry does not stop it. Run:

    .venv/bin/python -m tests.benchmarks.online_path
    .venv/bin/python -m tests.benchmarks.online_path --parts restart,training \\
        --restart-sizes 2000 20000 --training-sizes 20000
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PARTS = ("freshness", "serving", "restart", "training")

# the lines of each part's output that make its summary (the serving part: the tail)
SUMMARY = {
    "freshness": re.compile(r"^(speed layer ready|CPU while probing|freshness at)"),
    "restart": re.compile(r"^(restart of a speed member|\s+scored events|\s+[\d,]+\s+[\d.]+ s|t\()"),
    "training": re.compile(r"events: (views|training set)|^t\("),
}
SERVING_TAIL = 25


def command(part: str, args: argparse.Namespace) -> list[str]:
    python = [sys.executable, "-m", f"tests.benchmarks.{'batch_layer' if part == 'training' else part}"]
    if part == "freshness":
        return [*python, "--rate", str(args.rate), "--seconds", str(args.seconds), "--probes", str(args.probes)]
    if part == "serving":
        return [*python, *shlex.split(args.serving_args)]
    if part == "restart":
        return [*python, "--sizes", *map(str, args.restart_sizes), "--repeats", str(args.repeats),
                "--model-name", f"{args.model_name}-restart"]
    return [*python, "--sizes", *map(str, args.training_sizes), "--no-train"]


def run_part(part: str, args: argparse.Namespace, logs: Path) -> tuple[int, float, list[str]]:
    """(exit status, seconds, summary lines) of one part; its output goes to logs/<part>.log."""
    argv = command(part, args)
    log = logs / f"{part}.log"
    env = {**os.environ, "LAMBDALAKE_MODEL_NAME": f"{args.model_name}-{part}", "PYTHONUNBUFFERED": "1"}
    print(f"== {part}: {' '.join(argv[1:])} (output: {log})", flush=True)
    started = time.monotonic()
    lines: list[str] = []
    with log.open("w") as out:
        # stdout holds the figures, kept and written to the log as they come; stderr
        # (progress, logs) goes straight to the same file
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=out, text=True)
        assert process.stdout is not None
        for line in process.stdout:
            out.write(line)
            out.flush()
            lines.append(line.rstrip("\n"))
        process.wait()
    elapsed = time.monotonic() - started
    if part == "serving":
        summary = [line for line in lines if line.strip()][-SERVING_TAIL:]
    else:
        summary = [line for line in lines if SUMMARY[part].search(line)]
    if process.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        summary += [f"FAILED with exit status {process.returncode}; the end of {log}:", *tail]
    for line in summary:
        print(f"   {line}", flush=True)
    return process.returncode, elapsed, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--rate", type=float, default=2000.0, help="freshness: background events per second")
    parser.add_argument("--seconds", type=float, default=30.0, help="freshness: how long the stream runs")
    parser.add_argument("--probes", type=int, default=100, help="freshness: probe events")
    parser.add_argument("--serving-args", default="--skip-http",
                        help="serving: its options, as one string (e.g. \"--entities 100000 --at 100,1000,10000\")")
    parser.add_argument("--restart-sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=5, help="restart: restarts per size")
    parser.add_argument("--training-sizes", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--model-name", default=f"bench-online-{uuid.uuid4().hex[:6]}",
                        help="prefix of the registered models the parts serve (fresh: random signed models)")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)} (known: {', '.join(PARTS)})")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    logs = REPO / "var" / "logs" / "bench-online-path" / stamp
    logs.mkdir(parents=True, exist_ok=True)
    results = {part: run_part(part, args, logs) for part in parts}
    print(f"\n== issue 13 figures ({stamp}; logs in {logs})")
    for part, (status, seconds, summary) in results.items():
        print(f"{part} ({'ok' if status == 0 else f'FAILED, exit status {status}'}, {seconds:.0f}s):")
        for line in summary:
            print(f"   {line}")
    if any(status for status, _, _ in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
