"""Memory of the running local platform, per service: PSS (proportional set size, so pages
shared between forked workers count once) and RSS of every process in each service's
process groups. Run after `lambdalake up`:

    .venv/bin/python -m tests.benchmarks.platform_memory
"""

from __future__ import annotations

from pathlib import Path

from infra.platform import Platform
from infra.process import group_members
from lakehouse.config import load_settings


def _memory_kb(pid: int) -> tuple[int, int]:
    pss = rss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


def main() -> None:
    platform = Platform(load_settings())
    total_pss = total_rss = 0
    print(f"{'service':<10}{'processes':>10}{'PSS MiB':>10}{'RSS MiB':>10}")
    for health in platform.status():
        pids = [member for pid in health.pids for member in group_members(pid)]
        pss = sum(_memory_kb(pid)[0] for pid in pids)
        rss = sum(_memory_kb(pid)[1] for pid in pids)
        total_pss += pss
        total_rss += rss
        print(f"{health.service:<10}{len(pids):>10}{pss / 1024:>10.0f}{rss / 1024:>10.0f}")
    print(f"{'total':<10}{'':>10}{total_pss / 1024:>10.0f}{total_rss / 1024:>10.0f}")


if __name__ == "__main__":
    main()
