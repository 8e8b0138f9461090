"""Hostile answers and hostile hosts (issue 12, the classes closed so far): a rigged HF endpoint, a
model cache whose files try to pose as the probe's records, a FIFO where a blob belongs, and a
broken `nvidia-smi` on one host. Each case is judged by host state."""

from __future__ import annotations

import json
import re
import shlex
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

CACHE = "/srv/mlstack/hf-cache/hub/models--sentence-transformers--all-MiniLM-L6-v2"
GOOD_COMMIT = "0123456789abcdef" * 2 + "01234567"
GOOD_FILE = {"type": "file", "path": "config.json", "size": 2, "oid": "ab" * 20}
# repo -> (what /revision/main answers as the commit, the tree listing)
RIGGED = {
    "rig/bad-commit": ("$(touch /srv/pwned)" + "0" * 21, [GOOD_FILE]),
    "rig/control-chars": (GOOD_COMMIT, [GOOD_FILE, {**GOOD_FILE, "path": "evil\x1b]0;pwned\x07.txt"}]),
    "rig/bad-size": (GOOD_COMMIT, [GOOD_FILE, {**GOOD_FILE, "path": "weights.bin", "size": "many"}]),
}
REFUSED = {
    "rig/bad-commit": "which is not a commit (40 hex digits); refusing it",
    "rig/control-chars": "whose name has control characters, is empty or is too long; refusing this revision",
    "rig/bad-size": "'weights.bin' with a size that is not a byte count: 'many'; refusing this revision",
}


class RiggedEndpoint(BaseHTTPRequestHandler):
    def do_GET(self):
        match = re.fullmatch(r"/api/models/(rig/[\w-]+)/(revision/main|tree/[0-9a-f]{40})(\?.*)?", self.path)
        if not match or match[1] not in RIGGED:
            self.send_error(404)
            return
        commit, tree = RIGGED[match[1]]
        body = {"id": match[1], "sha": commit} if match[2] == "revision/main" else tree
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def rigged():
    server = ThreadingHTTPServer(("127.0.0.1", 0), RiggedEndpoint)  # asked by the control node only
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module", autouse=True)
def clean_hosts(fleet):
    fleet.wipe()
    yield
    fleet.wipe("/srv/pwned")


@pytest.mark.parametrize("repo", sorted(RIGGED))
def test_an_endpoint_answer_of_the_wrong_shape_is_refused_before_anything_is_cached_or_changed(
        fleet, rigged, repo, tmp_path):
    run = fleet.deploy("--data", f"hf_endpoint={rigged}", "--data", f"hf_control_cache_dir={tmp_path}",
                       "--data", json_data("models", [{"repo_id": repo, "revision": "main"}]),
                       "--data", json_data("service_models", {"RERANKING_MODEL": repo}))
    assert run.returncode != 0
    assert REFUSED[repo] in run.output, run.output[-3000:]
    assert "Traceback" not in run.output and "\x1b]0;pwned" not in run.output
    assert list(tmp_path.rglob("*.json")) == []  # no tree listing was cached
    for record in fleet.hosts:  # no directory, no env, nothing touched
        assert fleet.ssh(record, "ls -d /srv/mlstack /srv/pwned 2>/dev/null || true").split() == []


def json_data(key: str, value) -> str:
    return f"{key}={json.dumps(value)}"


@pytest.mark.heavy
def test_files_in_the_model_cache_cannot_pose_as_records_and_a_planted_fifo_cannot_hang_the_run(fleet):
    assert fleet.deploy().returncode == 0
    target = fleet.hosts[0]
    # The cache belongs to uid 1000: what that user can write there. A ref whose content is probe
    # records: before, the probe printed it raw, and "snapshot ../../../../ml-env" became a leftover
    # to `rm -rf` from the repo folder, i.e. /srv/mlstack/ml-env. A FIFO named like a blob: before,
    # hashing it blocked the deploy forever.
    fifo = "ee" * 32
    fleet.ssh(target, f"printf '\\nsnapshot ../../../../ml-env\\n' > {CACHE}/refs/evil && mkfifo {CACHE}/blobs/{fifo} "
                      f"&& chown -h 1000:1000 {CACHE}/refs/evil {CACHE}/blobs/{fifo}")
    env_before = fleet.ssh(target, "find /srv/mlstack/ml-env | sort | md5sum")
    run = fleet.deploy("--data", "model_verify_hashes=true")
    assert run.returncode == 0, run.output[-3000:]
    assert fleet.ssh(target, "find /srv/mlstack/ml-env | sort | md5sum") == env_before
    assert fleet.ssh(target, f"stat -c %F {CACHE}/blobs/{fifo}").strip() == "fifo"  # not ours: left alone
    assert run.report[target.name]["changes"] == []
    assert run.changed_operations() == []


@pytest.mark.heavy  # make test's 15 minutes: the probe part's framing stays there (test_names_that_are_not_utf8…)
def test_a_broken_nvidia_smi_fails_that_host_alone_and_the_other_converges(fleet):
    broken, other = fleet.hosts
    # A fixture, not a GPU: the line nvidia-smi prints when it cannot reach the driver, and its status,
    # bind-mounted over /usr/local/sbin in the host's own mount namespace (private propagation).
    fixture = ("#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
               "Make sure that the latest NVIDIA driver is installed and running.\"\nexit 9\n")
    fleet.ssh(broken, f"mkdir -p /srv/fixture-bin && printf %s {shlex.quote(fixture)} > /srv/fixture-bin/nvidia-smi "
                      "&& chmod 0755 /srv/fixture-bin/nvidia-smi && mount --bind /srv/fixture-bin /usr/local/sbin")
    try:
        before = fleet.ssh(broken, "find /srv/mlstack -printf '%p %m %u %s %T@\\n' | sort | md5sum")
        run = fleet.deploy("--data", json_data("stack_env", {"PROBE": "1"}))
        after = fleet.ssh(broken, "find /srv/mlstack -printf '%p %m %u %s %T@\\n' | sort | md5sum")
    finally:
        fleet.ssh(broken, "umount /usr/local/sbin && rm -r /srv/fixture-bin")
    assert run.returncode != 0
    failure = run.report[broken.name]["failure"]
    assert failure["step"] == "Host probe"
    assert "NVIDIA-SMI has failed because it couldn't communicate" in failure["message"]
    assert after == before  # the failed host was not touched
    assert run.report[other.name]["result"] == "ok"
    assert "PROBE" in fleet.ssh(other, "cat /srv/mlstack/compose/.env.digest")


SYSTEM_LISTING = ("find /etc /root /usr -xdev -printf '%p %u:%g %m %s %T@ %l\\n' | sort; "
                  "find /etc /root /usr -xdev -type f -exec md5sum {} + | sort")


def as_cache_owner(command: str) -> str:
    """COMMAND as uid 1000, the model cache's owner in the rehearsal (what that user can do there)."""
    return f"cd {CACHE} && setpriv --reuid=1000 --regid=1000 --clear-groups sh -c {shlex.quote(command)}"


def cache_problems(fleet, record) -> list[str]:
    """Every snapshot link that does not lead to a regular blob of this repo with the content its name says."""
    return fleet.ssh(record, f"cd {CACHE} && find snapshots -type l | while read -r link; do "
                             "blob=$(readlink -f \"$link\"); name=${blob##*/}; "
                             f"case $blob in {CACHE}/blobs/*) ;; *) echo \"$link leaves the repo\"; continue ;; esac; "
                             "[ -f \"$blob\" ] && [ ! -L \"$blob\" ] || echo \"$link: no blob\"; "
                             "[ ${#name} = 64 ] && [ \"$(sha256sum < \"$blob\" | cut -c1-64)\" != \"$name\" ] "
                             "&& echo \"$link: wrong content\"; done; true").split("\n")[:-1]


def assert_system_unchanged(before: str, after: str) -> None:
    gone, new = set(before.splitlines()) - set(after.splitlines()), set(after.splitlines()) - set(before.splitlines())
    assert not gone and not new, f"changed under /etc /root /usr: before {sorted(gone)[:10]}, after {sorted(new)[:10]}"


@pytest.mark.heavy
@pytest.mark.parametrize("plant", ["hub-to-etc", "links-in-the-repo"])
def test_links_the_cache_owner_plants_never_lead_root_outside_the_cache(fleet, plant):
    by_branch = ("--data", json_data("models", [{"repo_id": repo, "revision": "main"} for repo in (
        "sentence-transformers/all-MiniLM-L6-v2", "mlstack-test/nested-tiny")]))
    first = fleet.deploy(*by_branch)  # a branch, so the deploy writes refs/main
    assert first.returncode == 0, first.output[-3000:]
    target = fleet.hosts[0]
    commit = next(model["commit"] for model in first.report[target.name]["models"]
                  if model["repo_id"] == "sentence-transformers/all-MiniLM-L6-v2")
    if plant == "hub-to-etc":  # the example: before, `install -d -o 1000` chowned /etc to uid 1000
        fleet.ssh(target, as_cache_owner("cd ../.. && mv hub hub.moved && ln -s /etc hub"))
    else:  # before, root wrote through each of these links: a blob's upload, the tree's, the ref's
        blob = fleet.ssh(target, f"ls -S {CACHE}/blobs | head -1").strip()
        fleet.ssh(target, as_cache_owner(
            f"rm blobs/{blob} && ln -s /etc/hostname blobs/{blob}.incoming "
            f"&& rm trees/{commit}.json && ln -s /usr/lib/os-release trees/{commit}.json.incoming "
            f"&& printf {'f' * 40} > refs/main && ln -s /root/.profile refs/main.tmp "
            f"&& ln -s /etc snapshots/{commit}.tmp"))
    before = fleet.ssh(target, SYSTEM_LISTING, timeout=600)  # hashes all of /etc, /root and /usr: minutes under load
    run = fleet.deploy(*by_branch)
    after = fleet.ssh(target, SYSTEM_LISTING, timeout=600)
    assert run.returncode == 0, run.output[-3000:]
    assert_system_unchanged(before, after)
    assert run.report[target.name]["changes"] == ["models"]
    assert cache_problems(fleet, target) == []  # repaired: every file of the snapshot is there, intact
    assert fleet.ssh(target, f"cat {CACHE}/refs/main") == commit
    assert fleet.ssh(target, f"stat -c '%F %u' /srv/mlstack/hf-cache/hub {CACHE}/blobs").split("\n")[:-1] == [
        "directory 1000", "directory 1000"]
    assert fleet.deploy(*by_branch).changed_operations() == []


@pytest.mark.heavy  # make test's 15 minutes (the lock's checks: tests/unit/host/test_lock.py)
def test_a_lock_a_local_user_holds_does_not_block_the_deploy(fleet):
    target = fleet.hosts[0]
    # uid 1000 holds a flock on the lock's old place (world-writable /run/lock): before, this blocked every deploy
    fleet.ssh(target, "mkdir -p -m 1777 /run/lock")
    holder = fleet.ssh(target, "setpriv --reuid=1000 --regid=1000 --clear-groups "
                               "sh -c 'exec 9>/run/lock/mlstack-deploy.lock; flock 9; exec sleep 600' "
                               "</dev/null >/dev/null 2>&1 & echo $!").strip()
    try:
        held = "for i in $(seq 50); do flock -n /run/lock/mlstack-deploy.lock true || exit 0; sleep 0.1; done; exit 1"
        fleet.ssh(target, held)  # the user does hold it
        run = fleet.deploy()
    finally:
        fleet.ssh(target, f"kill {int(holder)}")
    assert run.returncode == 0, run.output[-3000:]
    assert run.report[target.name]["result"] == "ok"
    assert fleet.ssh(target, "stat -c '%u %a %F' /run/mlstack").strip() == "0 700 directory"


NOT_UTF8 = "$(printf '\\377')"  # a name with a byte that is not UTF-8 (issue 26)
H100 = (Path(__file__).parents[1] / "unit/host/fixtures/nvidia-smi-h100.txt").read_text().splitlines()[0]


def containers(fleet, record) -> str:
    return fleet.ssh(record, "docker ps -aq --no-trunc --filter label=com.docker.compose.project=mlstack-reranker "
                             "| sort")


def test_names_that_are_not_utf8_neither_cut_the_probe_off_nor_change_the_plan(fleet):
    """Issue 26: the probe printed such a name raw; paramiko's strict decoding stopped pyinfra's reader at that
    line with the exit status still 0, so every later part read as empty: the GPU part (a GPU host taken for a CPU
    host, its reservations dropped), the stack part (every service planned as new), the hash lines."""
    assert fleet.deploy().returncode == 0
    before = {record.name: containers(fleet, record) for record in fleet.hosts}
    for record in fleet.hosts:
        fleet.ssh(record, as_cache_owner(f'printf y > "blobs/{NOT_UTF8}" && mkdir "snapshots/{NOT_UTF8}" '
                                         f'&& printf {"0" * 40} > "refs/{NOT_UTF8}"'))
        fleet.ssh(record, f'cd /srv/mlstack && touch "ml-env/envs/{NOT_UTF8}" "compose/{NOT_UTF8}" '
                          f'&& if [ -d ml-env/objects ]; then touch "ml-env/objects/{NOT_UTF8}-644"; fi')
    run = fleet.deploy("--data", "model_verify_hashes=true", "--data", "ml_env_verify_hashes=true")
    assert run.returncode == 0, run.output[-3000:]
    assert [run.report[record.name]["changes"] for record in fleet.hosts] == [[], []]
    assert run.changed_operations() == []
    assert {record.name: containers(fleet, record) for record in fleet.hosts} == before

    gpu_host, cpu_host = fleet.hosts
    with fleet.gpu_shaped(gpu_host, [H100]):  # the GPU part is read whole: the reranker's reservation is planned
        dry = fleet.deploy("--dry", "--diff")
    assert dry.report[gpu_host.name]["result"] == "ok", dry.output[-3000:]
    uuid = H100.split(", ")[1]
    assert any(f"[{gpu_host.name}]" in line and f"- {uuid}" in line for line in dry.output.splitlines()), \
        dry.output[-3000:]
    assert dry.report[cpu_host.name]["changes"] == []
