"""What `mlstack prune` prints per host, and when it leaves the control caches alone (tasks/fleet/prune.py)."""

from __future__ import annotations

from pathlib import Path

from tasks.fleet.prune import control_caches, host_lines, human

IMAGE = "sha256:" + "ab" * 32


def record(tmp_path: Path, dry: bool, done=(), result: str = "ok") -> dict:
    return {"result": result, "failure": None if result == "ok" else {"cause": "step", "message": "boom"},
            "prune": {
                "keep": 2, "dry": dry, "current": "rel-2222222222222222",
                "releases": {"kept": [{"id": "rel-2222222222222222", "activated": "b", "env": "env-2", "project": "p"}],
                             "removed": [{"id": "rel-1111111111111111", "activated": "2026-12-07T04:00:00Z",
                                          "env": "env-0000000000000001", "project": "p"}]},
                "envs": [{"id": "env-0000000000000001", "bytes": 2_500_000}],
                "snapshots": [{"folder": "models--org--m", "commit": "a" * 40, "refs": ["v1"], "blobs": 1,
                               "bytes": 34}],
                "images": [{"id": IMAGE, "size": 150_000_000, "bytes": 2_300, "exact": True,
                            "services": ["docs", "web"]}],
                "notes": ["env env-0000000000000009 stays: a container of project other mounts it"],
                "needs": {"envs": ["env-2"], "folders": [], "models": {}, "images": []},
                "caches": {"ml_env": str(tmp_path / "ml-env"), "images": str(tmp_path / "images"),
                           "hf": str(tmp_path / "hf")},
                "done": list(done)}}


def test_a_dry_run_lists_what_would_go_with_its_size(tmp_path):
    assert "\n".join(host_lines("host1", record(tmp_path, True), 5)) == """\
host1  ok      keeps 1 release(s), would remove 1; would free 2.5 MB
       keep     rel-2222222222222222 (current)
       remove   release rel-1111111111111111 (activated 2026-12-07T04:00:00Z, env env-0000000000000001)
       remove   env env-0000000000000001  2.5 MB
       remove   model models--org--m@aaaaaaaaaaaa (1 file(s), refs v1)  34 B
       remove   image sha256:abababababab (docs, web)  2.3 kB
       note     env env-0000000000000009 stays: a container of project other mounts it"""


def test_a_run_says_what_went_and_what_a_failure_left(tmp_path):
    lines = host_lines("host1", record(tmp_path, False, ["releases", "envs"], "failed"), 5)
    assert lines[0] == "host1  FAILED  keeps 1 release(s), removed 1; freed 2.5 MB"
    assert lines[3:6] == ["       removed  env env-0000000000000001  2.5 MB",
                          "       KEPT     model models--org--m@aaaaaaaaaaaa (1 file(s), refs v1)  34 B",
                          "       KEPT     image sha256:abababababab (docs, web)  2.3 kB"]
    assert lines[-1] == "       failed   boom"
    assert host_lines("host2", {"result": "failed", "failure": {"cause": "unreachable", "message": "timed out"}},
                      5) == ["host2  FAILED  not read: unreachable: timed out"]
    assert [human(n) for n in (0, 999, 1000, 2_500_000, 3 * 10**9)] == ["0 B", "999 B", "1.0 kB", "2.5 MB", "3.0 GB"]


def test_the_control_caches_stay_unless_every_targeted_host_of_an_unnarrowed_run_was_read(tmp_path):
    (tmp_path / "ml-env").mkdir()
    (tmp_path / "ml-env" / "env-0000000000000001.tar.gz").write_bytes(b"x" * 10)
    report = {"host1": record(tmp_path, False), "host2": {"result": "failed", "failure": None}}
    lines, problem = control_caches(report, narrowed=False, dry=False)
    assert lines[0].startswith("control caches left as they are: host2 not read") and not problem
    lines, problem = control_caches({"host1": report["host1"]}, narrowed=True, dry=False)
    assert "--limit/--exclude narrowed the run" in lines[0] and not problem
    assert (tmp_path / "ml-env" / "env-0000000000000001.tar.gz").exists()
    lines, problem = control_caches({"host1": report["host1"]}, narrowed=False, dry=True)
    assert lines[1:] == ["  ml_env  env env-0000000000000001 (artifact)  10 B", "  would free 10 B"]
    assert (tmp_path / "ml-env" / "env-0000000000000001.tar.gz").exists()
    lines, problem = control_caches({"host1": report["host1"]}, narrowed=False, dry=False)
    assert lines[-1] == "  freed 10 B" and not problem
    assert not (tmp_path / "ml-env" / "env-0000000000000001.tar.gz").exists()
