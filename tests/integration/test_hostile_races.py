"""Races issue 12 names, on a real 2-host fleet, each judged by host state: an SSH connection killed
while the host works on a received env (its objects arrived, nothing published yet) followed at once by
a new deploy, and two hosts with other pattern sets for one commit in one run. The host's work is caught
by a fixture `dd`, not by timing, so every run takes the same path."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import tarfile
from pathlib import Path

import pytest
from fleet_helpers import CACHE, ENV_DIR, active, new_requirements, snapshot_hashes, ssh_sessions, wait_until

from rehearsal import hub
from tasks.fleet.runner import PYINFRA, run_deploy

pytestmark = pytest.mark.heavy  # long scenarios: make test-heavy

REPO = Path(__file__).parents[2]

COMMITS = hub.ensure_repos()
MINILM_SHA, NESTED_SHA = COMMITS[hub.MINILM]["main"], COMMITS[hub.NESTED]["main"]
MINILM_FOLDER, NESTED_FOLDER = "models--sentence-transformers--all-MiniLM-L6-v2", "models--mlstack-test--nested-tiny"

# The fixture `dd`, first on the PATH of the host's SSH sessions (bind-mounted over /usr/local/sbin in the host's
# own mount namespace). Only the check of an env transfer's staged objects (each read by `dd if=...` in
# incoming/<mark>: the whole stream has arrived, nothing is published yet) is held; every other call is the real
# dd at once. The first check records its pid and the pid of its chain (the receive program of the upload's
# channel: the oldest ancestor running env_store.sh) with their start times, and its folder; waits for `go`;
# runs the real dd (which opens the object only then) and records its status. With `release-on-next-check`,
# the next check of another chain says `go` itself and runs once that first chain has ended (then
# `orphan/ended-first`).
STATE = "/srv/fixture-state"
FIXTURE = f"""#!/bin/sh
state={STATE}
case "$1 $(pwd)" in
if=*/ml-env/incoming/*) ;;
*) exec /usr/bin/dd "$@" ;;
esac
start_of() {{ sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f20; }}  # a pid's start time (pids are reused)
chain_of() {{  # the oldest ancestor running env_store.sh receive
    chain="" pid=$PPID
    while [ "$pid" -gt 1 ]; do
        if tr '\\0' ' ' < "/proc/$pid/cmdline" | grep -q 'env_store[.]sh receive'; then chain=$pid; fi
        pid=$(sed 's/.*) //' "/proc/$pid/stat" | cut -d' ' -f2)
    done
    echo "$chain"
}}
if mkdir "$state/orphan" 2>/dev/null; then
    chain=$(chain_of)
    printf '%s\\n' "$$ $(start_of $$)" "$chain $(start_of "$chain")" "$(pwd)" > "$state/orphan/started.new"
    mv "$state/orphan/started.new" "$state/orphan/started"
    while [ ! -e "$state/go" ]; do sleep 0.1; done
    /usr/bin/dd "$@"
    status=$?
    echo "$status" > "$state/orphan/status"
    exit "$status"
fi
if [ -e "$state/release-on-next-check" ] && [ ! -e "$state/released" ] && [ -e "$state/orphan/started" ]; then
    first=$(sed -n 2p "$state/orphan/started")
    start=${{first#* }}
    first=${{first% *}}
    if [ "$(chain_of)" != "$first" ]; then
        touch "$state/released" "$state/go"
        tries=0
        while [ "$tries" -lt 600 ]; do
            now=$(sed 's/.*) //' "/proc/$first/stat" 2>/dev/null | cut -d' ' -f1,20)
            case $now in Z*|"") touch "$state/orphan/ended-first"; break ;; esac
            [ "${{now#* }}" = "$start" ] || {{ touch "$state/orphan/ended-first"; break; }}
            tries=$((tries + 1))
            sleep 0.1
        done
    fi
fi
exec /usr/bin/dd "$@"
"""
STAGED = re.compile(r"/incoming/([0-9a-f]{8})$")
PLANNED = re.compile(r"ML env: env-[0-9a-f]{16} → (env-[0-9a-f]{16}) \(")


@pytest.fixture(scope="module", autouse=True)
def clean_hosts(fleet):
    fleet.wipe()
    yield
    fleet.wipe()


def installed_files(fleet, record, env: str) -> dict[str, str]:
    """Every file of an installed env and its sha256, every link and its target."""
    output = fleet.ssh(record, f"cd {ENV_DIR}/envs/{env} && find . -type f -exec sha256sum {{}} + && "
                               "find . -type l -printf '-> %l  %p\\n'")
    return {path.removeprefix("./"): digest for digest, path in (line.split("  ", 1) for line in output.splitlines())}


def artifact_files(artifact: Path) -> dict[str, str]:
    """The same for the members of an env artifact, read on the control node."""
    files = {}
    with tarfile.open(artifact, "r:gz") as archive:
        for member in archive.getmembers():
            if member.isfile() or member.islnk():
                files[member.name] = hashlib.sha256(archive.extractfile(member).read()).hexdigest()
            elif member.issym():
                files[member.name] = f"-> {member.linkname}"
    return files


def started_at(pid: int) -> str | None:
    """When PID started (so that a reused pid is not taken for it); None once it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def held_check(state: Path) -> tuple[dict[int, str], str]:
    """The first check the fixture held: {pid: start time} of the fixture and of its chain, and its folder."""
    check, chain, folder = (state / "orphan" / "started").read_text().split("\n")[:3]
    return {int(pid): start for pid, start in (check.split(), chain.split())}, folder


def running(fleet, record, processes: dict[int, str]) -> list[int]:
    """Those of PROCESSES still running in RECORD's host (the very processes: same pid, same start time)."""
    here = fleet.fleet.host_pids(record)
    return [pid for pid, start in processes.items() if pid in here and started_at(pid) == start]


@contextlib.contextmanager
def checks_held(fleet, record):
    """RECORD's checks of staged env objects go through the fixture; afterwards no process of it is left and
    the mount is gone. Yields the fixture's state folder as the control node sees it."""
    fleet.ssh(record, f"mkdir -p /srv/fixture-bin {STATE} && printf %s {shlex.quote(FIXTURE)} "
                      "> /srv/fixture-bin/dd && chmod 0755 /srv/fixture-bin/dd "
                      "&& mount --bind /srv/fixture-bin /usr/local/sbin")
    state = fleet.fleet.host_dir(record.name) / STATE.removeprefix("/")
    try:
        assert fleet.ssh(record, "command -v dd").strip() == "/usr/local/sbin/dd"  # the chain's
        yield state
    finally:
        (state / "go").touch()  # a held check goes on (or, its files gone, fails)
        if (state / "orphan" / "started").exists():
            processes, _ = held_check(state)
            with contextlib.suppress(AssertionError):
                wait_until(lambda: not running(fleet, record, processes), "")
            for pid in running(fleet, record, processes):  # a chain that would not end (the test failed)
                os.kill(pid, signal.SIGKILL)
        fleet.ssh(record, f"umount /usr/local/sbin && rm -r /srv/fixture-bin {STATE}")


def start_deploy(fleet, log: Path, *args: str) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([PYINFRA, "inventory/rehearsal.py", "deploy.py", "-y", *args], cwd=REPO,
                                env={**os.environ, "MLSTACK_FLEET": fleet.fleet.name}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=out, start_new_session=True)


@pytest.mark.parametrize("release", ["after the new deploy", "during the new deploy's check"])
def test_a_connection_killed_mid_install_then_a_new_deploy_at_once_leaves_the_active_env_complete(
        fleet, env_cache, tmp_path, release):
    """The killed run's install, let go after the new deploy (its files are gone by then) or while the new
    deploy's own check waits (it publishes the env first), never leaves a partial env, a temporary name
    or a leftover: the active env is the new one, every file as in the artifact."""
    victim = fleet.hosts[1]
    fleet.wipe()
    converged = fleet.deploy("--limit", victim.name)
    assert converged.returncode == 0, converged.output[-3000:]
    old = active(fleet, victim)
    args = ("--limit", victim.name, "--data", f"ml_env_cache_dir={env_cache}", "--data", new_requirements(tmp_path))
    first_log = tmp_path / "first.log"
    with checks_held(fleet, victim) as state:
        first = start_deploy(fleet, first_log, *args)
        try:
            started = state / "orphan" / "started"

            def check_began() -> bool:
                assert first.poll() is None, "the deploy ended before its env check:\n" + first_log.read_text()[-3000:]
                return started.exists()

            wait_until(check_began, "the env check did not begin", timeout=600)
            orphan, folder = held_check(state)
            mark = STAGED.search(folder).group(1)
            (new,) = set(PLANNED.findall(first_log.read_text()))
            for pid in ssh_sessions(fleet, victim):  # the connection dies on the host's side, mid install
                os.kill(pid, signal.SIGKILL)
            first.wait(timeout=120)
        finally:
            if first.poll() is None:  # the test failed before: stop the deploy before the fixture goes
                os.killpg(first.pid, signal.SIGKILL)
                first.wait(timeout=30)
        output = first_log.read_text()
        assert first.returncode != 0, output[-3000:]
        assert f"[{victim.name}] ML env {new}: the connection was lost during the upload" in output, output[-3000:]
        assert running(fleet, victim, orphan) == list(orphan)  # the killed run's install goes on, held
        wait_until(lambda: subprocess.run([*fleet.fleet.ssh_argv(victim), "flock -n /run/mlstack/deploy.lock true"],
                                          capture_output=True, timeout=60).returncode == 0,
                   "the killed run's deploy lock was not released")  # it went with the connection

        if release != "after the new deploy":
            (state / "release-on-next-check").touch()
        rerun = fleet.deploy(*args)
        assert rerun.returncode == 0, rerun.output[-3000:]
        (state / "go").touch()

        wait_until(lambda: not running(fleet, victim, orphan), "the killed run's install did not end")
        status = (state / "orphan" / "status").read_text().strip()
        if release == "after the new deploy":
            assert status != "0"  # the new deploy had removed the objects it checks
        else:
            assert (state / "orphan" / "ended-first").exists()  # the interleaving this case is about
            assert status == "0"  # it checked and published the env; the new deploy kept it

    assert active(fleet, victim) == new != old
    expected = artifact_files(env_cache / f"{new}.tar.gz")
    assert ".mlstack-env.json" in expected and len(expected) > 100
    assert installed_files(fleet, victim, new) == expected
    assert fleet.ssh(victim, f"ls -A {ENV_DIR}/envs").split() == sorted([old, new])  # no *.tmp-*
    assert fleet.ssh(victim, f"ls -A {ENV_DIR}/incoming") == ""
    assert fleet.ssh(victim, f"find {ENV_DIR} -name '*{mark}*'") == ""  # nothing of the killed run is left

    third = fleet.deploy(*args)
    assert third.returncode == 0, third.output[-3000:]
    assert third.changed_operations() == []


# host -> its patterns for the nested repo at one commit, and the files they select there
PATTERNS = {
    "host1": ({"allow_patterns": ["*.json"]}, {"config.json", "sub/dir/deep.json"}),
    "host2": ({"ignore_patterns": ["*.json", ".git*"]}, {"README.md", "weights/part.safetensors"}),
}
INVENTORY = '''"""The rehearsal inventory with models of each host's own (tests/integration/test_hostile_races.py)."""
import json
import runpy

_hosts, _data = runpy.run_path({inventory!r})["rehearsal"]
_models = json.loads({models!r})
rehearsal = ([(name, {{**data, "models": _models[name]}}) for name, data in _hosts], _data)
'''


def test_two_hosts_with_other_patterns_for_one_commit_converge_in_one_run_each_with_exactly_its_files(
        fleet, tmp_path):
    """Control mode downloads once per repo, commit and patterns: each host gets exactly what its own
    patterns select at the commit the other host also uses, in one run; the rerun changes nothing."""
    assert sorted(PATTERNS) == [record.name for record in fleet.hosts]
    models = {name: [{"repo_id": hub.MINILM, "revision": MINILM_SHA},
                     {"repo_id": hub.NESTED, "revision": NESTED_SHA, **patterns}]
              for name, (patterns, _) in PATTERNS.items()}
    inventory = tmp_path / "per_host_patterns.py"
    inventory.write_text(INVENTORY.format(inventory=str(REPO / "inventory" / "rehearsal.py"),
                                          models=json.dumps(models)))

    def deploy():
        return run_deploy("-y", "--data", f"hf_control_cache_dir={tmp_path / 'hf-control'}",
                          inventory=str(inventory), env={"MLSTACK_FLEET": fleet.fleet.name})

    fleet.wipe()
    run = deploy()
    assert run.returncode == 0, run.output[-3000:]
    nested = hub.expected_files(hub.NESTED, NESTED_SHA)
    for record in fleet.hosts:
        _, selected = PATTERNS[record.name]
        assert snapshot_hashes(fleet, record, NESTED_FOLDER, NESTED_SHA) == {
            path: digest for path, digest in nested.items() if path in selected}
        assert snapshot_hashes(fleet, record, MINILM_FOLDER, MINILM_SHA) == hub.expected_files(hub.MINILM, MINILM_SHA)
        repo = f"{CACHE}/hub/{NESTED_FOLDER}"
        assert len(fleet.ssh(record, f"ls -A {repo}/blobs").split()) == len(selected)  # nothing else was sent
        assert fleet.ssh(record, f"find {CACHE}/hub -name '*.incoming*' -o -name '*.tmp*'") == ""
        assert [model["commit"] for model in run.report[record.name]["models"]] == [MINILM_SHA, NESTED_SHA]

    before = len(hub.access_log(fleet.fleet.dir))
    again = deploy()
    assert again.returncode == 0, again.output[-3000:]
    assert again.changed_operations() == []
    assert len(hub.access_log(fleet.fleet.dir)) == before  # full shas and a complete control cache: no request
