"""`make bench`: the full deploy on 1, 4 and 8 rehearsal hosts — first run (fresh control caches: the
env and the image are built, the models downloaded), no-op rerun and dry run — next to the SSH floor,
with the bytes each host received and the bytes the endpoints served, all measured in one run.

Prints tables; asserts only that each run did what it is timed as. Uses its own fleet ("bench") and
removes it at the end.

Bytes to a host: the control side of its veth (every byte the host received: SSH, and for the
first host — the builder — the index's wheels too). Bytes served: what left the package index's and
the HF mirror's ports, counted by an nftables table of counters that exists only during the bench.
"""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from rehearsal import hub, index
from rehearsal.baseimage import ensure_archive
from rehearsal.fleet import Fleet, HostRecord
from tasks.fleet.runner import DeployRun, run_deploy

SIZES = (1, 4, 8)
NFT_TABLE = "mlstack_bench"
ENDPOINTS = {"index": index.PORT, "mirror": hub.PORT}
REPEATS = 3
CACHES = ("ml_env_cache_dir", "hf_control_cache_dir", "image_cache_dir")


def ssh_floor(fleet: Fleet, records: list[HostRecord]) -> float:
    """Parallel `ssh host true` to every host: the least any converge can cost."""
    def one(record):
        subprocess.run([*fleet.ssh_argv(record), "true"], check=True)

    started = time.monotonic()
    with ThreadPoolExecutor(len(records)) as pool:
        list(pool.map(one, records))
    return time.monotonic() - started


@dataclass
class Traffic:
    to_hosts: list[int]  # bytes each host received
    served: dict[str, int]  # endpoint -> bytes written


class Meter:
    """Byte counters read before and after a run; `with Meter(...)` adds the endpoint counters and removes them."""

    def __init__(self, fleet: Fleet, records: list[HostRecord]):
        self.fleet, self.records = fleet, records

    def __enter__(self):
        nft(f"add table inet {NFT_TABLE}")
        try:
            nft(f"add chain inet {NFT_TABLE} out {{ type filter hook output priority 0; policy accept; }}")
            for name, port in ENDPOINTS.items():
                nft(f"add counter inet {NFT_TABLE} served_{name}")
                nft(f"add rule inet {NFT_TABLE} out tcp sport {port} counter name served_{name}")
        except subprocess.CalledProcessError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        nft(f"delete table inet {NFT_TABLE}")

    def read(self) -> Traffic:
        to_hosts = [int(Path(f"/sys/class/net/{self.fleet.veth(number)}/statistics/tx_bytes").read_text())
                    for number in range(1, len(self.records) + 1)]
        served = {}
        for name in ENDPOINTS:
            listing = json.loads(nft(f"-j list counter inet {NFT_TABLE} served_{name}"))["nftables"]
            served[name] = next(item["counter"]["bytes"] for item in listing if "counter" in item)
        return Traffic(to_hosts, served)

    def during(self, run) -> tuple[DeployRun, Traffic]:
        before = self.read()
        result = run()
        after = self.read()
        return result, Traffic([b - a for a, b in zip(before.to_hosts, after.to_hosts, strict=True)],
                               {name: after.served[name] - before.served[name] for name in after.served})


def nft(command: str) -> str:
    return subprocess.run(["nft", *shlex.split(command)], check=True, capture_output=True, text=True).stdout


def deploy(*args: str, env: dict, caches: list[str]) -> DeployRun:
    run = run_deploy(*args, *caches, env=env)
    assert run.returncode == 0, run.output[-3000:]
    return run


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
            with Meter(fleet, records) as meter, tempfile.TemporaryDirectory(prefix="mlstack-bench-") as scratch:
                caches = [arg for key in CACHES for arg in ("--data", f"{key}={scratch}/{key}")]
                first, first_bytes = meter.during(partial(deploy, "-y", env=env, caches=caches))
                assert "building" in first.output  # fresh caches: the env and the image were built
                noop, noop_bytes = [], None
                for _ in range(REPEATS):
                    run, noop_bytes = meter.during(partial(deploy, "-y", env=env, caches=caches))
                    assert not run.changed_operations(), run.changed_operations()
                    noop.append(run.seconds)
                dry = statistics.median(deploy("--dry", env=env, caches=caches).seconds for _ in range(REPEATS))
            floor = statistics.median(ssh_floor(fleet, records) for _ in range(REPEATS))
            rows.append((size, up_seconds, first.seconds, statistics.median(noop), dry, floor, first_bytes, noop_bytes))
    finally:
        fleet.down()

    print(f"\n{'hosts':>5} {'fleet-up s':>11} {'first s':>8} {'no-op s':>8} {'dry run s':>10} {'ssh floor s':>12} "
          f"{'no-op/floor':>12} {'no-op/1-host':>13}")
    one_host = rows[0][3]
    for size, up_seconds, first_seconds, noop_seconds, dry, floor, _, _ in rows:
        print(f"{size:>5} {up_seconds:>11.1f} {first_seconds:>8.2f} {noop_seconds:>8.2f} {dry:>10.2f} {floor:>12.2f} "
              f"{noop_seconds / floor:>12.2f} {noop_seconds / one_host:>13.2f}")

    print(f"\n{'hosts':>5} {'first: to host 1 MB':>20} {'to each other MB':>17} {'index MB':>9} {'mirror MB':>10} "
          f"{'no-op: to a host kB':>20} {'index kB':>9} {'mirror kB':>10}")
    for size, *_, first_bytes, noop_bytes in rows:
        others = first_bytes.to_hosts[1:]
        print(f"{size:>5} {first_bytes.to_hosts[0] / 1e6:>20.1f} "
              f"{(statistics.median(others) / 1e6 if others else float('nan')):>17.1f} "
              f"{first_bytes.served['index'] / 1e6:>9.1f} {first_bytes.served['mirror'] / 1e6:>10.1f} "
              f"{max(noop_bytes.to_hosts) / 1e3:>20.1f} {noop_bytes.served['index'] / 1e3:>9.1f} "
              f"{noop_bytes.served['mirror'] / 1e3:>10.1f}")
    print(f"\n(times: medians of {REPEATS}; first = fresh control caches; no-op = a rerun that changes nothing; "
          "host 1's engine is the builder, so its first-run bytes include the wheels; fleet-up excludes the "
          "one-time base image build)")


if __name__ == "__main__":
    main()
