"""`make bench-status`: the wall time of `mlstack status` on N rehearsal hosts (default 8; `make bench-status N=4`,
or `python -m bench.status 4`)
against an empty pyinfra run on the same hosts (`pyinfra INVENTORY exec -- true`: start-up, the inventory, a
connection and one command per host), in pairs taken in alternating order, medians of 5.

The fleet (its own: "bench", as `make bench` uses) is brought up and converged once, so that
status reads what a real host holds (a release, the env, the models, a running service), then brought down at
the end. Prints the status it timed and a table; asserts only that each run exited 0 (status: every host read).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rehearsal.baseimage import ensure_archive
from rehearsal.fleet import Fleet
from tasks.fleet.runner import PYINFRA, run_deploy

REPEATS = 5
INVENTORY = "inventory/rehearsal.py"
MLSTACK = str(Path(sys.executable).with_name("mlstack"))


def timed(argv: list[str], env: dict) -> float:
    started = time.monotonic()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - started
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    return seconds


def main() -> None:
    hosts = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    ensure_archive()  # the one-time debootstrap is not part of the bench
    fleet = Fleet("bench")
    env = {**os.environ, "MLSTACK_FLEET": fleet.name}
    try:
        fleet.up(hosts)
        converged = run_deploy("-y", env={"MLSTACK_FLEET": fleet.name})
        assert converged.returncode == 0, converged.output[-3000:]
        status = [MLSTACK, "status", INVENTORY]
        empty = [PYINFRA, "-y", INVENTORY, "exec", "--", "true"]
        timed(status, env), timed(empty, env)  # warm: the first runs fill the page cache
        pairs = []
        for number in range(REPEATS):
            first, second = (status, empty) if number % 2 == 0 else (empty, status)
            times = {id(first): timed(first, env), id(second): timed(second, env)}
            pairs.append((times[id(status)], times[id(empty)]))
        table = subprocess.run(status, env=env, capture_output=True, text=True, timeout=600).stdout
    finally:
        fleet.down()
    status_s = statistics.median(pair[0] for pair in pairs)
    empty_s = statistics.median(pair[1] for pair in pairs)
    ratio = statistics.median(pair[0] / pair[1] for pair in pairs)
    print(f"\nWhat it read:\n{table}")
    print(f"\n{'hosts':>5} {'mlstack status s':>17} {'empty pyinfra run s':>20} {'ratio (median of pairs)':>24}")
    print(f"{hosts:>5} {status_s:>17.2f} {empty_s:>20.2f} {ratio:>24.2f}")
    print(f"\n(medians of {REPEATS} pairs, alternating which runs first; the empty run is `pyinfra {INVENTORY} "
          "exec -- true`; each pair: " + ", ".join(f"{s:.2f}/{e:.2f}" for s, e in pairs) + ")")


if __name__ == "__main__":
    main()
