"""The fan-out's decisions (tasks/host/fanout.py) as pure functions of what the plan knows, and the store taking in
what a swarm fetched (`env_store.sh adopt`, run here on this machine's coreutils)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tasks.config import HostConfig
from tasks.control.builder import BaseImage
from tasks.control.swarm import SwarmResult
from tasks.host.fanout import Swarm, describe, kit_problem, peer_address
from tasks.host.programs import program

MB = 1_000_000
STAMP = 1577836800


def swarm(*members: tuple[str, int | None], min_hosts: int = 3, min_bytes: int = 64 * MB) -> Swarm:
    made = Swarm("ML env", "env-0123456789abcdef", Path("/cache/objects"), Path("/cache"), min_hosts, min_bytes)
    for number, (name, planned) in enumerate(members):
        made.join(name, f"10.0.0.{number + 1}", 51871, planned)
    return made


def state(*failed: str):
    return SimpleNamespace(failed_hosts=[SimpleNamespace(name=name) for name in failed])


def test_the_host_that_lacks_least_seeds_and_the_plan_says_what_leaves_the_control_node():
    fan = swarm(("host1", 300 * MB), ("host2", 100 * MB), ("host3", 300 * MB))
    assert fan.plan() == "host2 is sent 100.0 MB by the control node and seeds; 2 host(s) fetch 600.0 MB between hosts"
    assert [fan.role(state(), name) for name in ("host1", "host2", "host3")] == ["leech", "seed", "leech"]


def test_too_few_hosts_or_too_few_bytes_keep_the_direct_path():
    few = swarm(("host1", 300 * MB), ("host2", 300 * MB))
    assert few.plan() == ("2 host(s) so far need env-0123456789abcdef; a swarm takes 3 hosts and 64 MB, else the "
                          "direct path (the last host's line gives the plan)")
    assert few.role(state(), "host1") is None
    small = swarm(("host1", MB), ("host2", MB), ("host3", MB))
    assert small.role(state(), "host1") is None


def test_an_archive_not_made_yet_counts_as_large_enough_and_the_plan_says_so():
    fan = swarm(("host1", None), ("host2", None), ("host3", None))
    assert fan.plan() == ("host1 is sent env-0123456789abcdef by the control node once it is made, and seeds; "
                          "2 host(s) fetch it between hosts")
    assert [fan.role(state(), name) for name in ("host1", "host2", "host3")] == ["seed", "leech", "leech"]


def test_the_swarm_is_the_largest_group_sent_the_same_file_once_all_live_members_said_which():
    fan = swarm(("host1", None), ("host2", None), ("host3", None), ("host4", None), ("host5", None))
    arrivals = [threading.Thread(target=fan.arrive, args=(state("host4"), name, variant))  # host4 failed before
                for name, variant in (("host1", "api-1-without-a.tar.gz"), ("host2", "api-1-without-b.tar.gz"),
                                      ("host3", "api-1-without-b.tar.gz"), ("host5", "api-1-without-b.tar.gz"))]
    began = time.monotonic()
    for arrival in arrivals:
        arrival.start()
    for arrival in arrivals:
        arrival.join(10)
    assert fan.arrived.is_set() and time.monotonic() - began < 5  # nobody waited for host4
    assert [fan.role(state("host4"), name) for name in ("host1", "host2", "host3", "host4", "host5")] == [
        None, "seed", "leech", None, "leech"]


def test_a_host_that_failed_before_the_step_neither_seeds_nor_counts():
    fan = swarm(("host1", 10 * MB), ("host2", 300 * MB), ("host3", 300 * MB), ("host4", 300 * MB))
    assert fan.role(state("host1"), "host2") == "seed"  # host1 lacked least but failed
    assert fan.role(state("host1"), "host1") is None
    assert swarm(("host1", 300 * MB), ("host2", 300 * MB), ("host3", 300 * MB)).choose(state("host3")) == ()


def test_only_members_that_lack_something_take_part_and_all_registered_opens_the_torrent():
    fan = swarm(("host1", 300 * MB), ("host2", 100 * MB), ("host3", 300 * MB))
    fan.choose(state())
    fan.register("host1", {"a-644": 5})
    assert not fan.registered.is_set()
    fan.register("host3", {})
    assert fan.registered.is_set() and fan.participants() == ["host2", "host1"]
    assert fan.endpoint("host1") == "10.0.0.1:51871"


def test_the_peer_address_is_an_ip_the_setting_or_the_ssh_address_never_a_name():
    assert peer_address(HostConfig(stack="reranker"), "10.1.2.3") == "10.1.2.3"
    assert peer_address(HostConfig(stack="reranker"), "gpu-01.example") is None
    assert peer_address(HostConfig(stack="reranker", fanout_address="10.9.9.9"), "gpu-01.example") == "10.9.9.9"
    with pytest.raises(ValueError, match="expected an IP address"):
        HostConfig(stack="reranker", fanout_address="gpu-01.example")


def test_a_runtime_image_with_another_python_cannot_run_the_kit():
    assert kit_problem(BaseImage("python:3.11-slim", "sha256:1", "python3.11", "linux/amd64")) is None
    problem = kit_problem(BaseImage("python:3.12-slim", "sha256:1", "python3.12", "linux/amd64"))
    assert problem and "python3.12" in problem


def adopt(env_dir: Path, mark: str) -> str:
    result = subprocess.run(["sh", "-c", program("env_store.sh", "adopt", env_dir, mark)], capture_output=True,
                            text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_adopt_takes_only_objects_whose_content_is_their_name_and_gives_them_their_mode_and_time(tmp_path):
    env_dir, mark = tmp_path / "env", "0badc0de"
    arrived = env_dir / "incoming" / mark / "objects"
    arrived.mkdir(parents=True)
    good, bad = b"a good object\n", b"what a bad peer sent\n"
    good_name = hashlib.sha256(good).hexdigest() + "-755"
    bad_name = hashlib.sha256(b"what was asked for\n").hexdigest() + "-644"
    (arrived / good_name).write_bytes(good)
    (arrived / bad_name).write_bytes(bad)
    secret = tmp_path / "secret"
    secret.write_bytes(b"not the owner's\n")
    linked = hashlib.sha256(secret.read_bytes()).hexdigest() + "-644"
    (arrived / linked).symlink_to(secret)
    fifo = "0" * 64 + "-644"
    os.mkfifo(arrived / fifo)

    said = adopt(env_dir, mark)

    assert said == "1 object(s), 0.0 MB, taken into the store from the swarm; 1 dropped"
    assert sorted(os.listdir(env_dir / "objects")) == [good_name]
    taken = (env_dir / "objects" / good_name).stat()
    assert (taken.st_mode & 0o7777, int(taken.st_mtime)) == (0o755, STAMP)
    assert not (env_dir / "incoming" / mark).exists()
    assert adopt(env_dir, mark) == "nothing arrived"


def test_what_a_peer_says_reaches_the_log_as_printable_text_only():
    said = describe(SwarmResult(False, reason="\x1b[2Jstalled\r"))
    assert said == "the swarm did not finish (?[2Jstalled?); the rest is sent directly"


def run_peer(tmp_path: Path, env_dir: Path, kit: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """`swarm.sh peer` as a leecher, with a `docker` on PATH that only records that it was asked to run."""
    bin_dir, called = tmp_path / "bin", tmp_path / "docker-called"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "docker").write_text(f"#!/bin/sh\necho \"$1\" >> {called}\n")
    (bin_dir / "docker").chmod(0o755)
    ids = f"{os.getuid()}:{os.getgid()}"
    command = program("swarm.sh", "peer", kit, "sha256:1", "python3.11", ids, env_dir / "incoming/0badc0de",
                      env_dir / "objects", "leech", "10.0.0.1:51871", 60, 30, "10.0.0.2:51871")
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=20,
                            env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    return result, called


def test_the_peer_is_started_only_on_the_owners_own_directories_never_through_a_link(tmp_path):
    env_dir = tmp_path / "env"
    (env_dir / "incoming/0badc0de/objects").mkdir(parents=True)
    kit = tmp_path / "stack/swarm-kit/k"
    kit.mkdir(parents=True)
    result, called = run_peer(tmp_path, env_dir, kit)
    assert result.returncode == 0 and "run" in called.read_text().split(), result.stderr
    called.unlink()

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "objects").mkdir(parents=True)
    os.rename(env_dir / "incoming/0badc0de", tmp_path / "moved")
    (env_dir / "incoming/0badc0de").symlink_to(elsewhere)  # what the env owner could plant
    result, called = run_peer(tmp_path, env_dir, kit)
    assert result.returncode == 1 and "reached without a link; the peer is not started" in result.stderr
    assert "run" not in (called.read_text().split() if called.exists() else [])
