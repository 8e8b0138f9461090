"""`make bench`: fleet-up, first and no-op converge of the full deploy, and dry-run time, next to the
SSH floor, measured in one run.

Prints a table; asserts nothing. Uses its own fleet ("bench") and removes it at the end.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from rehearsal.baseimage import ensure_archive
from rehearsal.fleet import Fleet
from tasks.runner import run_deploy

SIZES = (1, 4, 8)
REPEATS = 3


def ssh_floor(fleet: Fleet, records) -> float:
    """Parallel `ssh host true` to every host: the least any converge can cost."""
    def one(record):
        subprocess.run([*fleet.ssh_argv(record), "true"], check=True)

    started = time.monotonic()
    with ThreadPoolExecutor(len(records)) as pool:
        list(pool.map(one, records))
    return time.monotonic() - started


def main() -> None:
    ensure_archive()  # the one-time debootstrap is not part of fleet-up time
    fleet = Fleet("bench")
    env = {"MLSTACK_FLEET": fleet.name}
    rows = []
    try:
        for size in SIZES:
            fleet.down()
            started = time.monotonic()
            records = fleet.up(size)
            up_seconds = time.monotonic() - started
            first = run_deploy("-y", env=env)
            assert first.returncode == 0, first.output[-2000:]
            noop = [run_deploy("-y", env=env) for _ in range(REPEATS)]
            assert all(run.returncode == 0 and not run.changed_operations() for run in noop)
            dry = statistics.median(run_deploy("--dry", env=env).seconds for _ in range(REPEATS))
            floor = statistics.median(ssh_floor(fleet, records) for _ in range(REPEATS))
            noop_seconds = statistics.median(run.seconds for run in noop)
            rows.append((size, up_seconds, first.seconds, noop_seconds, dry, floor))
    finally:
        fleet.down()

    print(f"\n{'hosts':>5} {'fleet-up s':>11} {'first deploy s':>15} {'no-op deploy s':>15} {'dry run s':>10} "
          f"{'ssh floor s':>12} {'no-op/floor':>12} {'no-op/1-host':>13}")
    one_host = rows[0][3]
    for size, up_seconds, first_seconds, noop_seconds, dry, floor in rows:
        print(f"{size:>5} {up_seconds:>11.1f} {first_seconds:>15.2f} {noop_seconds:>15.2f} {dry:>10.2f} {floor:>12.2f}"
              f" {noop_seconds / floor:>12.1f} {noop_seconds / one_host:>13.2f}")
    print(f"\n(medians of {REPEATS}; no-op = a rerun that changes nothing; fleet-up excludes the one-time base image build)")


if __name__ == "__main__":
    main()
