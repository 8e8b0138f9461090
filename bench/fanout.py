"""`make bench-fanout`: hosts feed hosts (issue 25) against the direct path, at 8 and 16 rehearsal hosts.

For each fleet size (one fleet, "fanb", wiped between runs, a fresh control cache each size):

- the first install of the rehearsal deploy, `fanout=off` against `fanout=auto` with `fanout_min_bytes=0` (so
  the rehearsal's small env, its two models and its built image fan out too);
- an upgrade whose new env holds a 210 MB wheel of random bytes (incompressible: what is sent is what is new),
  from the same pre-upgrade state each time (a wipe and a first deploy before the direct one);
- a deploy that changes nothing (the fixed cost of a run, for the model's calibration).

Both envs are built (and unpacked into the control cache) by dry runs before the timed deploys, so those time
transfers, not builds. Per run: bytes the control node sent (the fleet bridge's own tx counter: host-to-host
traffic is forwarded by the bridge, never counted there), bytes one host that does not seed received (the
control side of its veth: all it was sent, by the control node and by its peers), wall time. Then the model
(bench/fanout_model.py) calibrated with these figures (`python -m bench.fanout 8`: one size only). Targets:
control egress <= 1.3x the new bytes at 8 and 16 hosts; the fan-out's wall time no worse than the direct
path's at 8 hosts.
"""

from __future__ import annotations

import os
import random
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench import fanout_model
from bench.env_store import deploy, on_host
from rehearsal.fleet import Fleet, HostRecord
from tasks.control.env_store import read_tree, tree_objects
from tests.integration.fleet_helpers import new_requirements

SIZES = (8, 16)
BALLAST = "mlstack-fanout-bench"
BALLAST_BYTES = 210_000_000
PLANNED = re.compile(r"\[host\d+\] ML env: (?:none|env-[0-9a-f]{16}) → (env-[0-9a-f]{16})")
SEED = re.compile(r"ML env fan-out: (host\d+) is sent")
DIRECT, FANOUT = ("fanout=off",), ("fanout=auto", "fanout_min_bytes=0")


@dataclass
class Row:
    hosts: int
    step: str  # "first install" | "upgrade"
    path: str  # "direct" | "fan-out"
    new: int  # bytes of env objects new to the hosts
    control: int  # bytes the control node sent into the fleet
    host: str  # the host whose received bytes are shown (not the seed)
    received: int
    seconds: float


def control_sent(fleet: Fleet) -> int:
    return int(Path(f"/sys/class/net/{fleet.bridge}/statistics/tx_bytes").read_text())


def wipe(fleet: Fleet, records: list[HostRecord]) -> None:
    """Every host as before any deploy (TestFleet.wipe): the stack's containers removed, /srv/mlstack gone."""
    for record in records:
        on_host(fleet, record, "docker ps -aq --filter label=com.docker.compose.project"
                               " | xargs -r docker rm -f >/dev/null; rm -rf /srv/mlstack")


def timed(fleet: Fleet, records: list[HostRecord], common: list[str], data: tuple[str, ...], label: str,
          new: int) -> Row:
    """One deploy, measured: control egress, what a host that did not seed received, wall time."""
    args = [arg for item in data for arg in ("--data", item)]
    before = control_sent(fleet)
    print(f"bench: {label}", file=sys.stderr, flush=True)
    run, sent = deploy(fleet, records, "-y", *common, *args)
    control = control_sent(fleet) - before
    seeds = set(SEED.findall(run.output))
    index = next(i for i in range(len(records) - 1, -1, -1) if records[i].name not in seeds)
    step, path = label.split(": ")[1:]
    return Row(len(records), step, path, new, control, records[index].name, sent[index], run.seconds)


def plan(fleet: Fleet, records: list[HostRecord], common: list[str], requirements: str | None) -> str:
    """The env a deploy with REQUIREMENTS (None: the rehearsal's) installs, built and unpacked by a dry run."""
    extra = ("--data", requirements) if requirements else ()
    run, _ = deploy(fleet, records, "--dry", *common, *extra)
    (env,) = set(PLANNED.findall(run.output))
    return env


def one_size(fleet: Fleet, count: int, scratch: Path, upgrade: str) -> tuple[list[Row], float]:
    """The four measured runs at COUNT hosts, and the wall time of a deploy that changes nothing."""
    records = fleet.up(count)
    wipe(fleet, records)
    cache = scratch / f"cache-{count}"
    common = ["--data", f"ml_env_cache_dir={cache}"]
    old, new = plan(fleet, records, common, None), plan(fleet, records, common, upgrade)
    held = tree_objects(read_tree(cache, old) or {})
    first = sum(held.values())
    fresh = sum(size for name, size in tree_objects(read_tree(cache, new) or {}).items() if name not in held)
    label = f"{count} hosts: %s: %s"
    rows = [timed(fleet, records, common, DIRECT, label % ("first install", "direct"), first)]
    wipe(fleet, records)
    rows.append(timed(fleet, records, common, FANOUT, label % ("first install", "fan-out"), first))
    rows.append(timed(fleet, records, common, (*FANOUT, upgrade), label % ("upgrade", "fan-out"), fresh))
    idle = timed(fleet, records, common, (*FANOUT, upgrade), label % ("nothing new", "fan-out"), 0)
    wipe(fleet, records)
    deploy(fleet, records, "-y", *common, "--data", "fanout=off")  # the pre-upgrade state again
    rows.append(timed(fleet, records, common, (*DIRECT, upgrade), label % ("upgrade", "direct"), fresh))
    rows[2], rows[3] = rows[3], rows[2]  # direct before fan-out in the table
    wipe(fleet, records)
    return rows, idle.seconds


def print_table(rows: list[Row], load: str) -> None:
    print(f"\nmachine: {os.cpu_count()} cores, load average at the start / end: {load}\n")
    print("| hosts | step | path | new env MB | control MB sent | control / new env | one host MB received "
          "| control / one host | wall s | fan-out / direct wall |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    walls = {(row.hosts, row.step, row.path): row.seconds for row in rows}
    for row in rows:
        relative = (f"{row.seconds / walls[(row.hosts, row.step, 'direct')]:.2f}" if row.path == "fan-out" else "")
        print(f"| {row.hosts} | {row.step} | {row.path} | {row.new / 1e6:.1f} | {row.control / 1e6:.1f} | "
              f"{row.control / row.new:.2f} | {row.received / 1e6:.1f} ({row.host}) | "
              f"{row.control / row.received:.2f} | {row.seconds:.1f} | {relative} |")


def verdict(rows: list[Row]) -> None:
    fanned = [row for row in rows if row.path == "fan-out"]
    egress = all(row.control <= 1.3 * row.new for row in fanned)
    walls = {(row.hosts, row.step, row.path): row.seconds for row in rows}
    at8 = all(walls[(8, step, "fan-out")] <= walls[(8, step, "direct")] for step in ("first install", "upgrade")
              if (8, step, "direct") in walls)
    print(f"\ntarget control egress <= 1.3x new bytes (fan-out runs): {'met' if egress else 'NOT met'}; "
          f"fan-out wall time no worse than direct at 8 hosts: {'met' if at8 else 'NOT met'}")


def calibration(rows: list[Row], idle: dict[int, float]) -> dict[int, float]:
    """fanout_model.FACTOR from each size's upgrades (the larger transfer) and its deploy with nothing new."""
    runs = {(row.hosts, row.path): row for row in rows if row.step == "upgrade"}
    return {count: fanout_model.overhead_factor(count, runs[(count, "direct")].new, runs[(count, "direct")].seconds,
                                                runs[(count, "fan-out")].seconds, seconds)
            for count, seconds in idle.items()}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    sizes = [int(size) for size in sys.argv[1:]] or SIZES  # `python -m bench.fanout 8`: one size
    fleet = Fleet("fanb")
    load = loadavg()
    rows: list[Row] = []
    idle: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="mlstack-bench-fanout-") as folder:
        scratch = Path(folder)
        upgrade = new_requirements(scratch, BALLAST, random.Random(31).randbytes(BALLAST_BYTES))
        try:
            for count in sizes:
                measured, idle[count] = one_size(fleet, count, scratch, upgrade)
                rows += measured
        finally:
            fleet.down()
    print_table(rows, f"{load} / {loadavg()}")
    verdict(rows)
    print(f"\na deploy with nothing new: {', '.join(f'{s:.1f} s at {n} hosts' for n, s in idle.items())}")
    factors = calibration(rows, idle)
    print(f"\nmodel calibration (swarm phase over its bound, upgrades): "
          f"{', '.join(f'{f:.2f} at {n} hosts' for n, f in factors.items())}; the model takes the largest")
    fanout_model.report(max(factors.values()))


if __name__ == "__main__":
    main()
