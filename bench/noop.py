"""`make bench-noop`: what a no-op deploy (nothing to change) costs the control node, against an empty pyinfra
deploy (a deploy file with no operation) on the same hosts, at 1, 8 and 16 rehearsal hosts (`python -m bench.noop
1 8`: other sizes), with the cost of each added host.

Control-node CPU is user+sys of the pyinfra process and every process it waited for (docker compose, ssh, git),
from `os.wait4`; wall time is from start to exit. Each size: the fleet grown to it and converged once, then
REPEATS pairs (empty, no-op) in alternating order; medians, and the ratio as the median of the pairs' ratios.
The slope is the least-squares fit of the medians over the sizes.

With `--against DIR` (a copy of another commit, e.g. `git archive HEAD~3 | tar -x -C /tmp/before`), that
copy's no-op (its tasks/ with this checkout's files/) is timed in the same rounds, as a third run: before and
after in one run, on the same hosts. The fleet is its own, $MLSTACK_BENCH_FLEET (default "bench"), brought down
at the end.
Every run reads its Python modules' bytecode, as an installed package does (pip compiles it): the bench compiles
the checkout's packages first, because no run writes any (pyinfra's CLI sets sys.dont_write_bytecode).
Asserts only that each run exited 0 and that each no-op changed nothing.
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rehearsal.baseimage import ensure_archive
from rehearsal.fleet import Fleet
from tasks.fleet.runner import PYINFRA, run_deploy
from tasks.paths import FILES

REPEATS = 5
INVENTORY = "inventory/rehearsal.py"
# The other checkout's deploy, reading this checkout's files/: the compose project's path is part of what a
# host's labels record, so a project read from another path would not be a no-op.
BEFORE = """import sys
from pathlib import Path

sys.path.insert(0, {tree!r})
import tasks.paths

assert tasks.paths.__file__.startswith({tree!r}), tasks.paths.__file__
tasks.paths.FILES = Path({files!r})
tasks.paths.STACKS = tasks.paths.FILES / "stacks"
from tasks.deploy import converge

converge()
"""


@dataclass(frozen=True)
class Sample:
    cpu: float  # user+sys of the process tree, seconds
    wall: float


def measured(argv: list[str], env: dict, cwd: str | None = None) -> Sample:
    """ARGV run to its end: its process tree's CPU (os.wait4) and its wall time; asserts it exited 0 and, for a
    deploy, that it changed nothing."""
    with tempfile.TemporaryFile() as out:
        started = time.monotonic()
        process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        log = out.read().decode(errors="replace")
    assert process.returncode == 0, f"{' '.join(argv)}: {log[-3000:]}"
    total = next(line.split() for line in log.splitlines() if line.strip().startswith("Grand total"))
    assert total[3] in ("-", "0") and total[4] in ("-", "0"), f"{' '.join(argv)} changed or failed: {log[-3000:]}"
    return Sample(usage.ru_utime + usage.ru_stime, wall)


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares seconds per added host."""
    if len(points) < 2:
        return float("nan")
    mean_x = statistics.mean(x for x, _ in points)
    mean_y = statistics.mean(y for _, y in points)
    return (sum((x - mean_x) * (y - mean_y) for x, y in points)
            / sum((x - mean_x) ** 2 for x, _ in points))


def pairs_at(runs: dict[str, tuple[list[str], str | None]], env: dict) -> dict[str, list[Sample]]:
    """REPEATS rounds of every run, the order rotating each round."""
    names = list(runs)
    for name in names:  # warm: the first runs fill the page cache
        measured(runs[name][0], env, runs[name][1])
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    for number in range(REPEATS):
        order = names[number % len(names):] + names[:number % len(names)]
        for name in order:
            samples[name].append(measured(runs[name][0], env, runs[name][1]))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.noop")
    parser.add_argument("sizes", nargs="*", type=int, default=[1, 8, 16])
    parser.add_argument("--against", help="a checkout of another commit: its no-op timed in the same rounds")
    options = parser.parse_args()
    ensure_archive()  # the one-time debootstrap is not part of the bench
    fleet = Fleet(os.environ.get("MLSTACK_BENCH_FLEET", "bench"))
    folder = tempfile.mkdtemp(prefix="bench-noop-")
    for tree in (Path.cwd(), *([Path(options.against)] if options.against else [])):
        for package in ("tasks", "rehearsal", "inventory"):
            compileall.compile_dir(tree / package, quiet=1)
    env = {**os.environ, "MLSTACK_FLEET": fleet.name}
    empty_deploy = Path(folder) / "empty_deploy.py"
    empty_deploy.write_text('"""No operation: what pyinfra costs on its own with this inventory."""\n')
    runs: dict[str, tuple[list[str], str | None]] = {
        "empty": ([PYINFRA, "-y", INVENTORY, str(empty_deploy)], None),
        "no-op": ([PYINFRA, "-y", INVENTORY, "mlstack.deploy.converge"], None),
    }
    if options.against:
        before_deploy = Path(folder) / "before_deploy.py"
        before_deploy.write_text(BEFORE.format(tree=str(Path(options.against).resolve()), files=str(FILES)))
        runs["no-op before"] = ([PYINFRA, "-y", INVENTORY, str(before_deploy)], None)
    results: dict[int, dict[str, list[Sample]]] = {}
    try:
        for hosts in sorted(options.sizes):
            fleet.up(hosts)
            converged = run_deploy("-y", env={"MLSTACK_FLEET": fleet.name})
            assert converged.returncode == 0, converged.output[-3000:]
            results[hosts] = pairs_at(runs, env)
    finally:
        fleet.down()
        shutil.rmtree(folder)
    report(results, list(runs))


def report(results: dict[int, dict[str, list[Sample]]], names: list[str]) -> None:
    cpu = {hosts: {name: statistics.median(s.cpu for s in samples[name]) for name in names}
           for hosts, samples in results.items()}
    wall = {hosts: {name: statistics.median(s.wall for s in samples[name]) for name in names}
            for hosts, samples in results.items()}
    header = f"{'hosts':>5}" + "".join(f" {name + ' CPU s':>17} {name + ' wall s':>18}" for name in names)
    header += "".join(f" {name + ' / empty CPU':>22}" for name in names[1:])
    print("\n" + header)
    for hosts, samples in results.items():
        line = f"{hosts:>5}" + "".join(f" {cpu[hosts][name]:>17.2f} {wall[hosts][name]:>18.2f}" for name in names)
        for name in names[1:]:
            ratios = [run.cpu / empty.cpu for run, empty in zip(samples[name], samples["empty"], strict=True)]
            line += f" {statistics.median(ratios):>22.2f}"
        print(line)
    print("\nCPU per added host (least squares over the sizes' medians):")
    for name in names:
        print(f"  {name:>14}: {slope([(hosts, cpu[hosts][name]) for hosts in results]):.3f} s")
    for name in names[1:]:
        print(f"  {name + ' - empty':>14}: "
              f"{slope([(hosts, cpu[hosts][name] - cpu[hosts]['empty']) for hosts in results]):.3f} s")
    print(f"\n(medians of {REPEATS} rounds, the order rotating each round; CPU: user+sys of each run's process tree; "
          "each round's CPU, " + "/".join(names) + ":")
    for hosts, samples in results.items():
        rounds = zip(*(samples[name] for name in names), strict=True)
        print(f"  {hosts:>2} hosts: " + ", ".join("/".join(f"{s.cpu:.2f}" for s in one) for one in rounds))
    print(")")


if __name__ == "__main__":
    main()
