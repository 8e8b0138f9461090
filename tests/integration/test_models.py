"""Models on a real 2-host fleet, from the fleet's real HF mirror (olah): place, load offline, repair, refuse."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fleet_helpers import CACHE, ENV_DIR, hub_requests, snapshot_hashes

from rehearsal import hub
from rehearsal.baseimage import IMAGE_NAME
from tasks.fleet.runner import PYINFRA

REPO = Path(__file__).parents[2]

COMMITS = hub.ensure_repos()
MINILM_SHA, NESTED_SHA = COMMITS[hub.MINILM]["main"], COMMITS[hub.NESTED]["main"]
MINILM_FOLDER, NESTED_FOLDER = "models--sentence-transformers--all-MiniLM-L6-v2", "models--mlstack-test--nested-tiny"


@pytest.fixture
def control_cache(tmp_path):
    return tmp_path / "hf-control"


@pytest.fixture(autouse=True)
def fresh_hosts(fleet):
    for record in fleet.hosts:
        fleet.ssh(record, "umount /srv/small 2>/dev/null; rm -rf /srv/small")
    fleet.wipe()


def deploy(fleet, control_cache, *data: str, dry: bool = False, limit: str | None = None):
    args = [arg for item in data for arg in ("--data", item)]
    args += ["--dry"] if dry else []
    args += ["--limit", limit] if limit else []
    return fleet.deploy(*args, "--data", f"hf_control_cache_dir={control_cache}")


def models_data(*entries: dict) -> str:
    return "models=" + json.dumps(list(entries))


def in_runtime_image(fleet, record, script: str) -> str:
    env = fleet.ssh(record, f"readlink {ENV_DIR}/active").strip()
    return fleet.ssh(record, f"docker run --rm --network none -v {CACHE}:/root/.cache/huggingface:ro "
                             f"-v {ENV_DIR}/{env}:/root/.local:ro -e HF_HUB_OFFLINE=1 "
                             "-e PYTHONPATH=/root/.local/lib/python3.11/site-packages "
                             f"{IMAGE_NAME} python3 -c '{script}'")


def test_both_models_land_in_the_standard_layout_load_offline_and_the_rerun_asks_the_mirror_nothing(
        fleet, control_cache):
    first = deploy(fleet, control_cache)
    assert first.returncode == 0, first.output[-3000:]
    assert f"[host1] model {hub.MINILM}@{MINILM_SHA} ({MINILM_SHA[:12]}):" in first.output
    for record in fleet.hosts:
        assert snapshot_hashes(fleet, record, MINILM_FOLDER, MINILM_SHA) == hub.expected_files(hub.MINILM, MINILM_SHA)
        assert snapshot_hashes(fleet, record, NESTED_FOLDER, NESTED_SHA) == hub.expected_files(hub.NESTED, NESTED_SHA)
        # Relative links (the cache works wherever it is mounted), the container's numeric owner, nothing in flight.
        assert fleet.ssh(record, f"find {CACHE}/hub -type l -lname '/*'; find {CACHE}/hub ! -user 1000; "
                                 f"find {CACHE}/hub -name '*.incoming*' -o -name '*.tmp*'") == ""
        loaded = in_runtime_image(fleet, record, (
            "from huggingface_hub import snapshot_download; import tokenizers; "
            f"path = snapshot_download(\"{hub.MINILM}\", revision=\"{MINILM_SHA}\"); "
            "tokenizer = tokenizers.Tokenizer.from_file(path + \"/tokenizer.json\"); tokenizer.no_padding(); "
            "print(path, tokenizer.encode(\"hello world\").ids)"))
        assert loaded.strip() == (f"/root/.cache/huggingface/hub/{MINILM_FOLDER}/snapshots/{MINILM_SHA} "
                                  "[101, 7592, 2088, 102]")
    stamps = {record.name: fleet.ssh(record, f"find {CACHE}/hub -type f -printf '%i %T@ %p\\n' | sort")
              for record in fleet.hosts}

    before = len(hub_requests(fleet))
    second = deploy(fleet, control_cache)
    assert second.returncode == 0, second.output[-3000:]
    assert second.changed_operations() == []
    assert f"[host2] model {hub.NESTED}@{NESTED_SHA} ({NESTED_SHA[:12]}): no change" in second.output
    assert len(hub_requests(fleet)) == before  # full shas and a complete control cache: the endpoint is not asked
    for record in fleet.hosts:
        assert fleet.ssh(record, f"find {CACHE}/hub -type f -printf '%i %T@ %p\\n' | sort") == stamps[record.name]


def test_dry_run_lists_files_and_bytes_per_host_and_changes_nothing(fleet, control_cache):
    run = deploy(fleet, control_cache, dry=True)
    assert run.returncode == 0, run.output[-3000:]
    for record in fleet.hosts:
        line = re.search(rf"\[{record.name}\] model {hub.MINILM}@\w+ \(\w+\): "
                         r"(\d+) file\(s\), ([\d.]+) MB to transfer", run.output)
        assert line and int(line.group(1)) == len(hub.expected_files(hub.MINILM, MINILM_SHA))
        assert float(line.group(2)) > 90  # model.safetensors alone is 90.9 MB
        assert fleet.ssh(record, "ls /srv/mlstack 2>&1 || true").strip().endswith("No such file or directory")
    assert not (control_cache / MINILM_FOLDER / "blobs").exists()  # nothing downloaded either


@pytest.mark.heavy
def test_a_corrupted_blob_is_found_by_the_hash_check_and_repaired_on_that_host_only(fleet, control_cache):
    assert deploy(fleet, control_cache).returncode == 0
    damaged, healthy = fleet.hosts
    blob = f"{CACHE}/hub/{MINILM_FOLDER}/snapshots/{MINILM_SHA}/model.safetensors"
    fleet.ssh(damaged, f"dd if=/dev/zero of=$(readlink -f {blob}) bs=1M count=1 conv=notrunc status=none")

    sizes_only = deploy(fleet, control_cache)
    assert sizes_only.changed_operations() == []  # the same size: only a hash can tell

    hashed = deploy(fleet, control_cache, "model_verify_hashes=true")
    assert hashed.returncode == 0, hashed.output[-3000:]
    assert (f"[{damaged.name}] model {hub.MINILM}@{MINILM_SHA} ({MINILM_SHA[:12]}): 1 file(s), 90.9 MB to transfer"
            in hashed.output)
    assert all(hosts == [damaged.name] for _, hosts in hashed.changed_operations())
    assert snapshot_hashes(fleet, damaged, MINILM_FOLDER, MINILM_SHA)["model.safetensors"] == \
        hub.expected_files(hub.MINILM, MINILM_SHA)["model.safetensors"]


@pytest.mark.heavy
def test_a_host_without_room_fails_the_preflight_and_receives_nothing(fleet, control_cache):
    small, roomy = fleet.hosts
    fleet.ssh(small, "mkdir -p /srv/small && mount -t tmpfs -o size=64m,mode=0755 tmpfs /srv/small")
    try:
        run = deploy(fleet, control_cache, "model_cache_dir=/srv/small/hf-cache")
        assert run.returncode != 0
        assert f"[{small.name}] models: not enough disk space for the model cache:" in run.output
        assert fleet.ssh(small, "find /srv/small -type f | wc -l").strip() == "0"
        assert snapshot_hashes(fleet, roomy, NESTED_FOLDER, NESTED_SHA, cache="/srv/small/hf-cache") == \
            hub.expected_files(hub.NESTED, NESTED_SHA)
    finally:
        fleet.ssh(small, "umount /srv/small")


@pytest.mark.parametrize(("entry", "message"), [
    ({"repo_id": "mlstack-test/no-such-repo"},
     "models[0].repo_id = 'mlstack-test/no-such-repo': expected a model repo on {hub}; it is unknown there"),
    ({"repo_id": hub.NESTED, "revision": "v9"},
     f"models[0].revision = 'v9': expected a branch, tag or commit of {hub.NESTED} on {{hub}};"
     " it has none of that name"),
])
def test_an_unknown_repo_or_revision_fails_at_plan_time_and_no_host_changes(fleet, control_cache, entry, message):
    run = deploy(fleet, control_cache, models_data(entry),
                 "service_models=" + json.dumps({"RERANKING_MODEL": entry["repo_id"]}))
    assert run.returncode != 0
    assert message.format(hub=fleet.fleet.hub_url) in run.output
    assert "Traceback" not in run.output
    for record in fleet.hosts:
        assert fleet.ssh(record, "ls /srv/mlstack 2>&1 || true").strip().endswith("No such file or directory")


@pytest.mark.heavy
def test_a_transfer_killed_mid_blob_leaves_no_visible_snapshot_and_the_rerun_completes(fleet, control_cache):
    victim = fleet.hosts[0]
    assert deploy(fleet, control_cache, limit=victim.name).returncode == 0
    # lost: the next run sends it again, and is killed doing so
    fleet.ssh(victim, f"rm -rf {CACHE}/hub/{MINILM_FOLDER}")
    argv = [PYINFRA, "inventory/rehearsal.py", "deploy.py", "-y", "--limit", victim.name,
            "--data", f"hf_control_cache_dir={control_cache}"]
    process = subprocess.Popen(argv, cwd=REPO, env={**os.environ, "MLSTACK_FLEET": fleet.fleet.name},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    with fleet.throttled(victim):  # a stream at link speed would be over before a progress line
        try:
            for line in process.stderr:
                if "model file model.safetensors:" in line and "(100%)" not in line:
                    break
            else:
                raise AssertionError("the deploy ended before the model file was under way")
            os.killpg(process.pid, signal.SIGKILL)
        finally:
            process.wait(timeout=30)
    time.sleep(0.5)
    repo = f"{CACHE}/hub/{MINILM_FOLDER}"
    assert fleet.ssh(victim, f"ls {repo}/snapshots").split() == []  # nothing huggingface_hub could pick up
    # the host's end saw the stream end early: its check refused the partial blob and removed it
    deadline = time.monotonic() + 30
    while fleet.ssh(victim, f"ls {repo}/blobs | grep -c incoming || true").strip() != "0":
        assert time.monotonic() < deadline, "the partial blob was not removed"
        time.sleep(0.2)

    rerun = deploy(fleet, control_cache, limit=victim.name)
    assert rerun.returncode == 0, rerun.output[-3000:]
    assert snapshot_hashes(fleet, victim, MINILM_FOLDER, MINILM_SHA) == hub.expected_files(hub.MINILM, MINILM_SHA)
    assert fleet.ssh(victim, f"find {repo} -name '*.incoming*'") == ""


@pytest.mark.heavy
def test_host_mode_downloads_on_each_host_and_a_branch_revision_gets_its_ref(fleet, control_cache):
    entries = [{"repo_id": hub.MINILM, "revision": MINILM_SHA}, {"repo_id": hub.NESTED, "revision": "v1"}]
    before = len(hub_requests(fleet))
    run = deploy(fleet, control_cache, models_data(*entries), "model_mode=host")
    assert run.returncode == 0, run.output[-3000:]
    clients = {request.client.rsplit(":", 1)[0] for request in hub_requests(fleet)[before:]
               if "/resolve/" in request.path}
    assert clients == {record.ip for record in fleet.hosts}  # the hosts fetched the files, not the control node
    v1 = COMMITS[hub.NESTED]["v1"]
    for record in fleet.hosts:
        assert fleet.ssh(record, f"cat {CACHE}/hub/{NESTED_FOLDER}/refs/v1") == v1
        assert snapshot_hashes(fleet, record, NESTED_FOLDER, v1) == hub.expected_files(hub.NESTED, v1)
        assert fleet.ssh(record, f"ls -A {CACHE} | grep -c staging || true").strip() == "0"
        loaded = in_runtime_image(fleet, record, (
            "from huggingface_hub import snapshot_download; "
            f"print(snapshot_download(\"{hub.NESTED}\", revision=\"v1\"))"))
        assert loaded.strip() == f"/root/.cache/huggingface/hub/{NESTED_FOLDER}/snapshots/{v1}"
    assert not (control_cache / NESTED_FOLDER / "blobs").exists()  # the control node downloaded no file


@pytest.mark.parametrize("path", [  # one in make test, the other two shapes in make test-heavy (its 15 minutes)
    pytest.param("../../../../../../tmp/mlstack-escape", marks=pytest.mark.heavy),
    pytest.param("/tmp/mlstack-escape", marks=pytest.mark.heavy), "onnx/../../../mlstack-escape"])
def test_a_tree_listing_a_path_outside_the_repo_is_refused_before_any_host_changes(fleet, control_cache, path):
    # The deploy plans from what the mirror listed for the commit, kept as trees/<commit>.json in the
    # control cache: a hostile listing planted there is what a malicious mirror would have sent.
    assert deploy(fleet, control_cache, dry=True).returncode == 0
    tree_file = control_cache / MINILM_FOLDER / "trees" / f"{MINILM_SHA}.json"
    tree = json.loads(tree_file.read_text())
    tree["files"][path] = {"size": 4, "blob_id": "0" * 40}
    tree_file.write_text(json.dumps(tree))

    run = deploy(fleet, control_cache)
    assert run.returncode != 0
    assert (f"the endpoint lists a file {path!r} that would land outside the repo folder"
            in run.output), run.output[-2000:]
    for record in fleet.hosts:
        assert fleet.ssh(record, "ls -d /srv/mlstack 2>/dev/null || true") == ""
    # One walk of the whole file system from the control node: it holds every host's own directories (/srv, /tmp,
    # /root, /var/lib/docker: its state directory here) and the control cache, so it sees what a walk of / on
    # each host would (3 s or more a walk on this machine)
    assert subprocess.run(["find", "/", "-xdev", "-name", "mlstack-escape"], capture_output=True, text=True,
                          timeout=300).stdout == ""


@pytest.mark.heavy
def test_widening_the_patterns_at_one_commit_publishes_the_new_files_and_verify_sees_a_lost_link(
        fleet, control_cache):
    minilm = {"repo_id": hub.MINILM, "revision": MINILM_SHA}
    nested = {"repo_id": hub.NESTED, "revision": NESTED_SHA}
    expected = hub.expected_files(hub.NESTED, NESTED_SHA)
    narrow = deploy(fleet, control_cache, models_data(minilm, {**nested, "allow_patterns": ["*.json"]}))
    assert narrow.returncode == 0, narrow.output[-3000:]
    json_only = {path: digest for path, digest in expected.items() if path.endswith(".json")}
    assert 0 < len(json_only) < len(expected)
    wide = deploy(fleet, control_cache, models_data(minilm, nested))  # the same commit, every file
    assert wide.returncode == 0, wide.output[-3000:]
    for record in fleet.hosts:
        assert snapshot_hashes(fleet, record, NESTED_FOLDER, NESTED_SHA) == expected
    lost = sorted(expected)[0]
    fleet.ssh(fleet.hosts[0], f"rm {CACHE}/hub/{NESTED_FOLDER}/snapshots/{NESTED_SHA}/{lost}")
    verify = fleet.tool("tasks.fleet.verify", "--data", models_data(minilm, nested),
                        "--data", f"hf_control_cache_dir={control_cache}")
    assert verify.returncode == 1, verify.stdout + verify.stderr[-3000:]
    row = next(line for line in verify.stdout.splitlines() if line.startswith(fleet.hosts[0].name + " "))
    assert "DRIFT" in row and "models" in row
    repaired = deploy(fleet, control_cache, models_data(minilm, nested))
    assert snapshot_hashes(fleet, fleet.hosts[0], NESTED_FOLDER, NESTED_SHA) == expected
    assert repaired.report[fleet.hosts[0].name]["models"][1]["action"] == "repair"  # no byte sent: a link made
