"""The rehearsal hub's pure parts: deterministic seed repos, LFS pointers, olah's config, the access log."""

from __future__ import annotations

import json
import tomllib

from rehearsal import hub


def test_the_nested_repo_gets_the_pinned_commits_and_lfs_objects(tmp_path):
    repos = hub.ensure_repos(tmp_path, repo_ids=(hub.NESTED,))
    assert repos[hub.NESTED]["commits"] == hub.SEED_COMMITS[hub.NESTED]  # same shas on every machine
    assert repos[hub.NESTED]["v1"] == hub.SEED_COMMITS[hub.NESTED]["v1"]  # each ref at the top level too
    repo = repos[hub.NESTED]["path"]
    assert repo == tmp_path / "models/mlstack-test/nested-tiny" and (repo / ".git").is_dir()  # non-bare, as olah needs

    v1, main = hub.expected_files(hub.NESTED, "v1", tmp_path), hub.expected_files(hub.NESTED, "main", tmp_path)
    assert sorted(v1) == [".gitattributes", "README.md", "config.json", "sub/dir/deep.json", "weights/part.safetensors"]
    assert {path for path in v1 if v1[path] != main[path]} == {"config.json"}
    oid = v1["weights/part.safetensors"]
    assert hub.parse_lfs_pointer((repo / "weights/part.safetensors").read_bytes()) == (oid, 2_500_000)
    assert (repo / ".git/lfs/objects" / oid[:2] / oid[2:4] / oid).stat().st_size == 2_500_000

    marker = repo / ".git" / hub.SEED_MARKER
    built = marker.stat().st_mtime_ns
    assert hub.ensure_repos(tmp_path, repo_ids=(hub.NESTED,)) == repos  # seeded: nothing rebuilt
    assert marker.stat().st_mtime_ns == built

    (repo / ".git/lfs/objects" / oid[:2] / oid[2:4] / oid).unlink()  # a damaged mirror is built again
    assert hub.ensure_repos(tmp_path, repo_ids=(hub.NESTED,)) == repos
    assert (repo / ".git/lfs/objects" / oid[:2] / oid[2:4] / oid).stat().st_size == 2_500_000


def test_lfs_pointers_fit_what_olah_recognises():
    for size in (1, 2_500_000, 90_868_376, 10**12):
        pointer = hub.lfs_pointer("ab" * 32, size)
        assert 120 < len(pointer) < 150  # olah only reads blobs of that size as LFS pointers
        assert hub.parse_lfs_pointer(pointer) == ("ab" * 32, size)
    assert hub.parse_lfs_pointer(b'{"hidden_size": 8}\n') is None
    assert (hub.is_lfs("model.safetensors", 10) and hub.is_lfs("onnx/model.onnx", 10)
            and hub.is_lfs("big.json", 11 << 20))
    assert not hub.is_lfs("tokenizer.json", 466_247)


def test_the_generated_weights_are_a_valid_safetensors_file():
    data = hub.tiny_safetensors(2_500_000)
    assert len(data) == 2_500_000 and data == hub.tiny_safetensors(2_500_000)
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    assert header["weights"]["data_offsets"] == [0, 2_500_000 - 8 - length]


def test_olah_serves_the_mirror_offline_and_never_the_real_hub(tmp_path):
    config = tomllib.loads(hub.write_config(tmp_path, "10.213.7.1", 8090, tmp_path / "mirror").read_text())
    assert config["basic"]["host"] == "10.213.7.1" and config["basic"]["port"] == 8090
    assert config["basic"]["mirrors-path"] == [str(tmp_path / "mirror")]
    assert config["accessibility"]["offline"] is True
    assert config["basic"]["hf-netloc"] == config["basic"]["hf-lfs-netloc"] == hub.UPSTREAM
    assert hub.UPSTREAM.startswith("127.")
    assert hub.hub_url("10.213.7.1") == "http://10.213.7.1:8090"


def test_the_access_log_counts_every_answered_request(tmp_path):
    assert hub.access_log(tmp_path) == [] and hub.request_count(tmp_path) == 0
    hub.log_path(tmp_path).write_text(
        "2026-11-25 10:32:47 | ERROR | stderr | INFO:     Uvicorn running on http://10.213.7.1:8090\n"
        '2026-11-25 10:32:50 | INFO | stdout | INFO:     '
        '10.213.7.1:57106 - "GET /api/models/a/b/revision/v1 HTTP/1.1" 200 OK\n'
        '2026-11-25 10:32:51 | INFO | stdout | INFO:     '
        '10.213.7.11:5 - "HEAD /a/b/resolve/main/x%20y.json HTTP/1.1" 401 Unauthorized\n'
    )
    assert hub.access_log(tmp_path) == [
        hub.Request("10.213.7.1:57106", "GET", "/api/models/a/b/revision/v1", 200),
        hub.Request("10.213.7.11:5", "HEAD", "/a/b/resolve/main/x%20y.json", 401),
    ]
    assert hub.request_count(tmp_path) == 2
