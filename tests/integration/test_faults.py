"""Faults on a real 2-host fleet, each judged by the state left on the hosts: an SSH connection killed
mid env upload, a host down when the deploy starts, a disk filled during a transfer, two deploys at
once. (A blob transfer killed mid-file is in test_models; a failing health gate in test_stack.)"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fleet_helpers import (
    BALLAST_DATA,
    BALLAST_OBJECT,
    ENV_DIR,
    ArgvWatch,
    active,
    new_requirements,
    ssh_sessions,
    wait_until,
)

from tasks.fleet.runner import PYINFRA

pytestmark = pytest.mark.heavy  # long scenarios: make test-heavy

REPO = Path(__file__).parents[2]

PROJECT = "mlstack-reranker"
SENDING = re.compile(r"\] ML env (env-[0-9a-f]{16}): [\d.]+ / [\d.]+ MB sent")


@pytest.fixture(autouse=True)
def converged(fleet, env_cache):
    """Every test starts from a converged fleet (the rehearsal env active, the stack healthy)."""
    run = deploy(fleet, env_cache)
    assert run.returncode == 0, run.output[-3000:]
    yield
    fleet.wipe()


def deploy(fleet, env_cache, *data: str, limit: str | None = None):
    args = [arg for item in data for arg in ("--data", item)]
    return fleet.deploy("--data", f"ml_env_cache_dir={env_cache}", *args, *(("--limit", limit) if limit else ()))


def env_listing(fleet, record, env: str) -> str:
    """Every file of an installed env with its size and hash: equal means untouched and complete."""
    return fleet.ssh(record, f"cd {ENV_DIR}/envs/{env} && find . -type f -exec sha256sum {{}} + | sort")


def container_ids(fleet, record) -> str:
    return fleet.ssh(record, f"docker ps -q --no-trunc --filter label=com.docker.compose.project={PROJECT} | sort")


def veth(fleet, record) -> str:
    return fleet.fleet.veth(int(record.name.removeprefix("host")))


def start_deploy(fleet, env_cache, *data: str, limit: str | None = None) -> subprocess.Popen:
    argv = [PYINFRA, "inventory/rehearsal.py", "deploy.py", "-y", *(("--limit", limit) if limit else ()),
            "--data", f"ml_env_cache_dir={env_cache}", *[arg for item in data for arg in ("--data", item)]]
    return subprocess.Popen(argv, cwd=REPO, env={**os.environ, "MLSTACK_FLEET": fleet.fleet.name},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_upload(process: subprocess.Popen, log: list[str]) -> str:
    """Read the deploy's log until the env upload is under way; the env id being sent."""
    for line in process.stderr:
        log.append(line)
        sending = SENDING.search(line)
        if sending and "(100%)" not in line:
            return sending.group(1)
    raise AssertionError("the deploy ended before its env upload began:\n" + "".join(log[-40:]))


def wait_for_bytes(folder: Path, pattern: str, timeout: float = 60, below: float = float("inf")) -> None:
    """Until a file of FOLDER (a host's, seen from the control node) named like PATTERN holds something (and
    less than BELOW bytes)."""
    deadline = time.monotonic() + timeout
    while not any(0 < path.stat().st_size < below for path in folder.glob(pattern)):
        assert time.monotonic() < deadline, f"no {pattern} in {folder} received anything"
        time.sleep(0.05)


def finish(process: subprocess.Popen, log: list[str]) -> str:
    log.extend(process.stderr)
    process.wait(timeout=300)
    return "".join(log)


def test_ssh_killed_mid_env_upload_keeps_the_old_env_active_there_the_other_host_converges_and_the_rerun_too(
        fleet, env_cache, tmp_path):
    victim, other = fleet.hosts
    old = active(fleet, victim)
    old_files, old_containers = env_listing(fleet, victim, old), container_ids(fleet, victim)
    held = set(fleet.ssh(victim, f"ls {ENV_DIR}/envs").split())  # the old env, and any an earlier module left
    log: list[str] = []
    with fleet.throttled(victim):
        process = start_deploy(fleet, env_cache, new_requirements(tmp_path))
        new = wait_for_upload(process, log)
        # the ballast's object half there: the host cannot have the whole stream when its connection dies
        wait_for_bytes(fleet.fleet.host_dir(victim.name) / f"srv{ENV_DIR.removeprefix('/srv')}/incoming",
                       f"*/{BALLAST_OBJECT}", below=len(BALLAST_DATA))
        for pid in ssh_sessions(fleet, victim):  # the connection dies on the host's side
            os.kill(pid, signal.SIGKILL)
        output = finish(process, log)
    assert process.returncode != 0, output[-3000:]
    assert f"[{victim.name}] ML env {new}: the connection was lost during the upload" in output, output[-3000:]
    assert active(fleet, other) == new  # the run went on for the host that stayed reachable

    assert active(fleet, victim) == old
    assert env_listing(fleet, victim, old) == old_files
    assert container_ids(fleet, victim) == old_containers  # the stack was not touched
    # Whatever the host's end did with the part it received (its tar refuses a partial object; an orphaned
    # receive that had it all would finish the env under its own names), no partial env, tree in the making
    # or staged object is left: an env there is whole, and not active.
    def left() -> list[str]:
        return fleet.ssh(victim, f"ls -A {ENV_DIR}/incoming; ls {ENV_DIR}/envs").split()

    with contextlib.suppress(AssertionError):
        wait_until(lambda: set(left()) <= held | {new}, "")
    assert held <= set(left()) <= held | {new}, "the partial upload was not removed"
    if new in left():
        expected = fleet.ssh(other, f"cd {ENV_DIR}/envs/{new} && find . -type f -exec sha256sum {{}} + | sort")
        assert env_listing(fleet, victim, new) == expected  # whole: as on the host that converged
    assert active(fleet, victim) == old
    assert fleet.ssh(victim, f"find {ENV_DIR}/objects -type f -links 1") == ""  # none that no env links to

    rerun = deploy(fleet, env_cache, new_requirements(tmp_path), limit=victim.name)
    assert rerun.returncode == 0, rerun.output[-3000:]
    assert active(fleet, victim) == new
    assert fleet.ssh(victim, f"ls -A {ENV_DIR}/incoming; ls {ENV_DIR}/envs | grep -c tmp || true").split() == ["0"]


def test_a_host_down_at_the_start_fails_the_run_names_it_and_the_others_converge(fleet, env_cache):
    up, down = fleet.hosts
    device = veth(fleet, down)
    subprocess.run(["ip", "link", "set", device, "down"], check=True)
    try:
        rollout = fleet.tool("tasks.fleet.rollout", "--data", f"ml_env_cache_dir={env_cache}",
                             "--data", "rollout_canary=0", "--data", "rollout_batch=2",
                             "--data", "compose_project_dir_mode=0700")
    finally:
        subprocess.run(["ip", "link", "set", device, "up"], check=True)
    assert rollout.returncode == 1, rollout.stdout + rollout.stderr[-3000:]
    assert re.search(rf"^{down.name} +FAILED .*unreachable: \S", rollout.stdout, re.M), rollout.stdout
    assert re.search(rf"^{up.name} +ok ", rollout.stdout, re.M), rollout.stdout
    assert fleet.ssh(up, "stat -c %a /srv/mlstack/compose").strip() == "700"
    assert fleet.ssh(down, "stat -c %a /srv/mlstack/compose").strip() == "750"

    back = deploy(fleet, env_cache, "compose_project_dir_mode=0700")
    assert back.returncode == 0, back.output[-3000:]
    assert [name for name, _ in back.changed_operations()] == ["Host directories | Directory compose_project_dir "
                                                               "/srv/mlstack/compose (0:0 0700)"]
    assert back.per_host()[down.name]["changed"] == 1 and back.per_host()[up.name]["changed"] == 0


def test_a_disk_filled_during_the_env_upload_fails_clearly_shows_nothing_half_installed_and_the_rerun_converges(
        fleet, env_cache, tmp_path):
    victim = fleet.hosts[1]
    fleet.wipe()
    # /srv is a 600 MB tmpfs: room enough for the preflight; then another process takes it all mid upload.
    fleet.ssh(victim, "mount -t tmpfs -o size=600m,mode=0755 tmpfs /srv")  # root's alone, as /srv is
    filler = ""
    try:
        filler = fleet.ssh(victim, f"mkdir -p {ENV_DIR}/incoming; sh -c 'while [ -z \"$(find {ENV_DIR}/incoming "
                                   "-type f -size +0 | head -n 1)\" ]; do sleep 0.05; done; "
                                   "dd if=/dev/zero of=/srv/filler bs=1M' </dev/null >/dev/null 2>&1 & echo $!").strip()
        with fleet.throttled(victim):
            run = deploy(fleet, env_cache, limit=victim.name)
        assert run.returncode != 0
        assert re.search(r"ML env env-[0-9a-f]{16}: the upload failed \(the objects did not arrive whole \(tar: "
                         r"[0-9a-f]{64}-\d+: (Cannot (write|open): No space left on device|Wrote only \d+ of \d+ "
                         r"bytes)\)\); (No space left on device|\d+ MB free) on /srv; "  # partial gone: a few MB free
                         r"nothing was installed, the next run sends it again", run.output), run.output[-3000:]
        assert fleet.ssh(victim, "ls /srv/filler")  # the filler did fill it
        assert fleet.ssh(victim, f"readlink {ENV_DIR}/active || echo none").strip() == "none"
        assert fleet.ssh(victim, f"ls {ENV_DIR}/envs 2>/dev/null | grep -v '[.]tmp' || true") == ""
        assert fleet.ssh(victim, "docker ps -aq") == ""  # the stack never started

        fleet.ssh(victim, "rm /srv/filler")  # the operator frees the disk
        rerun = deploy(fleet, env_cache, limit=victim.name)
        assert rerun.returncode == 0, rerun.output[-3000:]
        assert active(fleet, victim).startswith("env-")
        assert fleet.ssh(victim, f"ls -A {ENV_DIR}/incoming; ls {ENV_DIR}/envs | grep -c tmp || true").split() == ["0"]
    finally:
        fleet.ssh(victim, f"kill {filler} 2>/dev/null || true")
        fleet.wipe()
        fleet.ssh(victim, "umount /srv")


def test_a_second_deploy_during_a_first_fails_clearly_and_leaves_the_first_to_finish(fleet, env_cache, tmp_path):
    victim = fleet.hosts[0]
    log: list[str] = []
    with fleet.throttled(victim):
        first = start_deploy(fleet, env_cache, new_requirements(tmp_path), limit=victim.name)
        new = wait_for_upload(first, log)
        second = deploy(fleet, env_cache, limit=victim.name)  # the old requirements: it would switch back
        output = finish(first, log)
    assert second.returncode != 0
    assert re.search(rf"\[{victim.name}\] {victim.name}: another deploy holds this host's lock "
                     rf"\(\S+@\S+ pid {first.pid} since \S+\): wait for it to end, then run again", second.output), \
        second.output[-3000:]
    assert second.changed_operations() == []
    assert first.returncode == 0, output[-3000:]
    assert active(fleet, victim) == new

    after = deploy(fleet, env_cache, new_requirements(tmp_path), limit=victim.name)  # the lock went with the first run
    assert after.returncode == 0 and after.changed_operations() == [], after.output[-3000:]


def test_large_uploads_go_through_openssh_and_over_the_deploys_own_connection_where_ssh_cannot_stand_in(
        fleet, env_cache):
    """The 90 MB model file reaches each fresh host through OpenSSH (key logins, as in the rehearsal), and
    over the deploy's own connection where ssh cannot stand in (here custom paramiko arguments, as a
    password login would); both times it arrives whole."""
    # the tail of tasks/host/channel.py's ssh_command argv to this fleet's hosts (others may run beside it)
    uploading = [f"\0IdentityAgent=none\0--\0{record.ip}\0" for record in fleet.hosts]
    model = "find /srv/mlstack/hf-cache/hub -path '*/snapshots/*/model.safetensors' -exec sha256sum {} +"
    fleet.wipe()
    with ArgvWatch(uploading) as watch, fleet.throttled(fleet.hosts[1], "200mbit"):  # seen for seconds
        by_openssh = deploy(fleet, env_cache)
    assert by_openssh.returncode == 0, by_openssh.output[-3000:]
    assert watch.hits, "no upload went through OpenSSH"
    arrived = {fleet.ssh(record, model).split()[0] for record in fleet.hosts}
    fleet.wipe()
    with ArgvWatch(uploading) as watch:
        by_channel = deploy(fleet, env_cache, 'ssh_paramiko_connect_kwargs={"timeout": 60}')
    assert by_channel.returncode == 0, by_channel.output[-3000:]
    assert watch.hits == []
    assert {fleet.ssh(record, model).split()[0] for record in fleet.hosts} == arrived and len(arrived) == 1
