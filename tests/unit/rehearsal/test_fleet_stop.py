"""Stopping a fleet's hosts (`rehearsal down`, and `up` reaping stale or extra hosts): side by side, each host's
supervisor waited for and its directory removed. Real processes, no root: each stands for a host's supervisor."""

from __future__ import annotations

import subprocess
import sys
import time

from rehearsal.fleet import Fleet, HostRecord, is_alive, mounted_below, process_starttime

# A supervisor that takes 1.5 s to go after SIGTERM, as a host's does while its dockerd stops the containers.
SLOW_TO_STOP = """import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1.5), sys.exit(0)))
print("ready", flush=True)
while True:
    time.sleep(0.1)
"""


def supervisor(fleet: Fleet, name: str) -> tuple[subprocess.Popen, HostRecord]:
    process = subprocess.Popen([sys.executable, "-c", SLOW_TO_STOP], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline() == "ready\n"
    (fleet.host_dir(name) / "srv").mkdir(parents=True)
    # netns -1: no process is in it, so no other process of this machine is taken for one of the host's
    return process, HostRecord(name, "10.213.0.11", process.pid, process_starttime(process.pid), netns=-1)


def test_hosts_stop_side_by_side_each_waited_for_and_its_directory_removed(tmp_path):
    fleet = Fleet("unitstop", state_root=tmp_path)
    started = [supervisor(fleet, f"host{number}") for number in (1, 2, 3)]
    records = [record for _, record in started]
    begun = time.monotonic()
    try:
        fleet.stop_hosts(records)
        took = time.monotonic() - begun
    finally:
        for process, _ in started:
            process.kill()
            process.wait()
    assert [process.returncode for process, _ in started] == [0, 0, 0]  # each went on its own, after its wait
    assert not any(is_alive(record) for record in records)
    assert not any(fleet.host_dir(record.name).exists() for record in records)
    # one after the other: 3 x 1.5 s at least
    assert took < 3.5, f"3 hosts that each take 1.5 s to stop took {took:.1f} s"


def test_a_fleets_leftover_mounts_are_its_own_never_those_of_a_fleet_whose_name_it_begins():
    """`fleet down` of "fan" must not report (or wait on) the mounts of a running fleet "fanb"."""
    root = "/var/lib/mlstack-rehearsal/fleets"
    line = "1194 1117 254:0 {} /root/.local ro,relatime - ext4 /dev/vda rw"
    assert mounted_below(line.format(f"{root}/fan/hosts/host1/srv"), f"{root}/fan")
    assert mounted_below(line.format(f"{root}/fan"), f"{root}/fan")
    assert not mounted_below(line.format(f"{root}/fanb/hosts/host7/srv"), f"{root}/fan")
