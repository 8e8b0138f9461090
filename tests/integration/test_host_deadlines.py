"""One host cannot hang the run (issue 26, part 3), on a real 2-host fleet: the ML env dir's owner (uid 1000)
stops the deploy's hashing of the env's objects, which runs as that user, with SIGSTOP. Before, the probe
waited for it forever, and pyinfra, which runs the hosts side by side but waits for all, with it: the whole
run, with the host's lock held. Now the probe ends at its deadline (`host_command_timeout`), its processes
on the host killed, that host fails naming the probe part, the other converges, and the next run works.

The stop is played by a fixture `sha256sum` first on the PATH of that host's SSH sessions (bind-mounted over
/usr/local/sbin in the host's own mount namespace, so no other host or fleet sees it): the first hash taken in
the env dir itself, the probe's, stops itself, as the owner's `kill -STOP` would, and records its pid."""

from __future__ import annotations

import shlex
import threading

import pytest

pytestmark = pytest.mark.heavy  # a converged fleet, then three deploys: make test-heavy

STATE = "/srv/fixture-state"
FIXTURE = f"""#!/bin/sh
case $(pwd) in
*/ml-env)
    if mkdir {STATE}/stopped 2>/dev/null; then
        echo $$ > {STATE}/stopped/pid
        kill -STOP $$
    fi ;;
esac
exec /usr/bin/sha256sum "$@"
"""
OWNER = ("--data", "ml_env_dir_uid=1000", "--data", "ml_env_dir_gid=1000")
DEADLINE = 40  # seconds: host_command_timeout for the run that meets the stopped hash (the other host's commands
# must each end within it, on a loaded machine too)
RELEASE_AFTER = 400  # seconds: then the test resumes the stopped hash, so code without deadlines fails, not hangs


@pytest.fixture(scope="module", autouse=True)
def clean_hosts(fleet):
    fleet.wipe()
    yield
    fleet.wipe()


def stopping_sha256sum(fleet, record) -> None:
    fleet.ssh(record, f"mkdir -p -m 1777 {STATE} && mkdir -p /srv/fixture-bin && "
                      f"printf %s {shlex.quote(FIXTURE)} > /srv/fixture-bin/sha256sum && "
                      "chmod 0755 /srv/fixture-bin/sha256sum && mount --bind /srv/fixture-bin /usr/local/sbin")


def stopped_pid_alive(fleet, record) -> bool:
    return fleet.ssh(record, f"pid=$(cat {STATE}/stopped/pid) && grep -q sha256sum /proc/$pid/cmdline 2>/dev/null "
                             "&& echo alive || true").strip() == "alive"


def test_a_hash_the_owner_stopped_fails_that_host_at_the_deadline_and_the_other_converges(fleet):
    assert fleet.deploy(*OWNER).returncode == 0
    stuck, other = fleet.hosts
    stopping_sha256sum(fleet, stuck)
    released = threading.Event()

    def resume() -> None:  # what code without deadlines needs to end at all
        released.set()
        fleet.ssh(stuck, f"kill -CONT $(cat {STATE}/stopped/pid)", check=False)

    release = threading.Timer(RELEASE_AFTER, resume)
    release.start()
    try:
        run = fleet.deploy(*OWNER, "--data", "ml_env_verify_hashes=true", "--data", f"host_command_timeout={DEADLINE}")
    finally:
        release.cancel()
        fleet.ssh(stuck, "umount /usr/local/sbin; rm -rf /srv/fixture-bin", check=False)
    assert fleet.ssh(stuck, f"cat {STATE}/stopped/pid", check=False).strip(), "the probe's hash was never stopped"
    assert not released.is_set(), f"the run waited for the stopped hash until the test resumed it ({run.seconds:.0f} s)"
    assert run.report[other.name]["result"] == "ok", run.output[-3000:]
    failure = run.report[stuck.name]["failure"]
    assert failure["step"] == "Host probe", failure
    assert f"ml_env: stopped at its deadline, after {DEADLINE} s (host_command_timeout): raise host_command_timeout" \
        in failure["message"], failure
    assert not stopped_pid_alive(fleet, stuck)  # killed on the host, though it was stopped

    again = fleet.deploy(*OWNER, "--data", "ml_env_verify_hashes=true")  # the lock went with the run; no stop now
    fleet.ssh(stuck, f"rm -rf {STATE}")
    assert again.returncode == 0, again.output[-3000:]
    assert [again.report[record.name]["result"] for record in fleet.hosts] == ["ok", "ok"]
