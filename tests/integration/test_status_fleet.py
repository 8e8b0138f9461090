"""`mlstack status` and `mlstack logs` on a converged fleet: what they report is what the hosts hold, and reading
changes nothing there and takes no lock."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest
from fleet_helpers import mlstack

from tasks.host.lock import LOCK_DIR
from tasks.host.programs import program

REPO = Path(__file__).parents[2]
ROOT = "/srv/mlstack"
COMPOSE = f"{ROOT}/compose"
# Everything below the stack root (paths, modes, owners, sizes, mtimes: the compose files, the releases, the env
# store, the model cache), the compose files' content, and the containers by id.
HOST_STATE = (f"find {ROOT} -printf '%p %m %u %g %s %T@\\n' | sort | sha256sum; "
              f"find {COMPOSE} -type f -exec sha256sum {{}} + | sort | sha256sum; "
              "docker ps -a -q --no-trunc | sort | sha256sum")


def status(fleet, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    result = mlstack(fleet, "status", "inventory/rehearsal.py", "--json", *args)
    return result, json.loads(result.stdout or "{}")


def test_status_reports_each_host_as_it_is_and_changes_nothing_there(fleet):
    fleet.wipe()
    converged = fleet.deploy()
    assert converged.returncode == 0, converged.output[-3000:]
    names = [record.name for record in fleet.hosts]
    before = {record.name: fleet.ssh(record, HOST_STATE) for record in fleet.hosts}
    result, found = status(fleet)
    table = mlstack(fleet, "status", "inventory/rehearsal.py")
    after = {record.name: fleet.ssh(record, HOST_STATE) for record in fleet.hosts}
    assert after == before  # no file, mode, mtime, release or container changed
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(found) == names
    for record in fleet.hosts:
        host = found[record.name]
        current = fleet.ssh(record, f"readlink {ROOT}/releases/current").strip()
        kept = fleet.ssh(record, f"cd {ROOT}/releases && ls -d rel-*").split()
        assert host["release"]["id"] == current and sorted(host["releases"]) == sorted(kept)
        assert host["release"]["activated"] and host["release"]["created"] and "@" in host["release"]["control_node"]
        assert host["env"] == fleet.ssh(record, f"readlink {ROOT}/ml-env/active").strip().removeprefix("envs/")
        assert "reranker" in host["services"]
        assert all(service == {"state": "running", "health": "healthy"} for service in host["services"].values())
        assert [(model["commit"], model["present"]) for model in host["models"]] == [
            (model["revision"], True) for model in host["models"]]  # the fleet pins commits
        assert host["drift"] == "ok" and host["problems"] == [] and host["errors"] == []
        assert host["lock"] == {"held": False, "holder": ""}
    assert table.returncode == 0
    rows = [line.split() for line in table.stdout.splitlines() if line.split()[:1] in ([name] for name in names)]
    assert [row[:3] for row in rows] == [[name, "ok", found[name]["release"]["id"]] for name in names]


def test_status_reports_a_held_lock_and_its_holder_without_taking_it_and_a_deploy_meanwhile_is_not_refused(fleet):
    first, second = fleet.hosts
    holder = subprocess.Popen([*fleet.fleet.ssh_argv(first), program("deploy_lock.sh", LOCK_DIR, "ops@laptop pid 7")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result, found = status(fleet)
        still = fleet.ssh(first, program("deploy_lock.sh", LOCK_DIR, "someone else") + " </dev/null")
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert result.returncode == 0, result.stderr[-3000:]
    assert found[first.name]["lock"] == {"held": True, "holder": "ops@laptop pid 7"}
    assert found[second.name]["lock"] == {"held": False, "holder": ""}
    assert still.strip() == "held by ops@laptop pid 7"  # status did not take it from its holder

    # status over and over while a deploy runs: the deploy takes every host's lock
    reads: list[subprocess.CompletedProcess] = []
    done = threading.Event()

    def keep_reading():
        while not done.is_set():
            reads.append(status(fleet)[0])

    reader = threading.Thread(target=keep_reading)
    reader.start()
    try:
        deployed = fleet.deploy()
    finally:
        done.set()
        reader.join()
    assert deployed.returncode == 0 and "another deploy holds" not in deployed.output, deployed.output[-3000:]
    assert reads and all(read.returncode == 0 for read in reads), [read.stderr[-500:] for read in reads]


@pytest.mark.heavy
def test_status_calls_a_stopped_service_degraded_and_a_hand_edit_modified_and_names_an_unreachable_host(fleet):
    first, second = fleet.hosts
    converged = fleet.deploy()  # on its own: the heavy tier runs it without the test above
    assert converged.returncode == 0, converged.output[-3000:]
    original = fleet.ssh(first, f"cat {COMPOSE}/compose.yaml")
    fleet.ssh(first, f"echo '# edited by hand' >> {COMPOSE}/compose.yaml")
    fleet.ssh(second, "docker ps -q --filter label=com.docker.compose.service=reranker | xargs docker stop")
    try:
        result, found = status(fleet)
    finally:
        fleet.ssh(first, f"cat > {COMPOSE}/compose.yaml <<'EOF'\n{original}EOF")
    assert result.returncode == 0, result.stderr[-3000:]
    assert found[first.name]["drift"] == "modified"
    assert found[first.name]["problems"] == ["compose.yaml edited since the deploy"]
    assert found[second.name]["drift"] == "degraded"
    assert found[second.name]["services"]["reranker"]["state"] == "exited"

    device = fleet.fleet.veth(int(second.name.removeprefix("host")))
    subprocess.run(["ip", "link", "set", device, "down"], check=True)
    try:
        unreachable, found = status(fleet)
    finally:
        subprocess.run(["ip", "link", "set", device, "up"], check=True)
    assert unreachable.returncode == 1
    assert found[second.name]["drift"] == "unknown" and found[second.name]["errors"][0].startswith("unreachable: ")
    assert found[first.name]["drift"] == "ok"  # its compose file is back as the release has it
    assert f"could not read {second.name}" in unreachable.stderr
    assert fleet.deploy().returncode == 0  # the stopped service back up, for the tests after this one


def test_logs_prints_each_hosts_lines_of_the_service_prefixed_by_its_name(fleet):
    names = [record.name for record in fleet.hosts]
    result = mlstack(fleet, "logs", "inventory/rehearsal.py", "reranker", "--tail", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    prefixes = [line.split(" | ", 1)[0] for line in lines]
    assert set(prefixes) == set(names) and prefixes == sorted(prefixes)  # every line is a host's, in host order
    assert all(1 <= prefixes.count(name) <= 5 for name in names)

    unknown = mlstack(fleet, "logs", "inventory/rehearsal.py", "nosuchservice", "--limit", names[0])
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr.startswith(
        f"{names[0]} | mlstack logs: docker compose logs exited with status 1: no service nosuchservice")
    refused = mlstack(fleet, "logs", "inventory/rehearsal.py", "reranker;id")
    assert refused.returncode == 2 and "compose service name" in refused.stderr
