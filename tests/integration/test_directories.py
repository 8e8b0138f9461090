"""Host directories on a real 2-host fleet: ownership on disk, idempotence, sudo, parents, drift."""

from __future__ import annotations

import pytest

DEFAULT_DIRS = {
    "/srv/mlstack": "0:0:755",
    "/srv/mlstack/ml-env": "0:0:755",
    "/srv/mlstack/hf-cache": "1000:1000:2775",  # the rehearsal inventory's container uid, no passwd entry
    "/srv/mlstack/compose": "0:0:750",
}


def stat_dirs(fleet, record, paths) -> dict[str, str]:
    output = fleet.ssh(record, "stat -c '%n %u:%g:%a %Z' " + " ".join(paths))
    return {line.split()[0]: line.split()[1:] for line in output.splitlines()}


def assert_no_change_anywhere(run, hosts):
    assert run.returncode == 0, run.output[-2000:]
    assert run.changed_operations() == []
    per_host = run.per_host()
    assert sorted(per_host) == sorted(record.name for record in hosts)
    for name, counts in per_host.items():
        assert counts["changed"] == 0 and counts["error"] == 0
        assert run.report[name]["planned"] and run.report[name]["changes"] == [], run.report[name]
        assert f"[{name}] Host directories: 4 as configured (no change)" in run.output


def test_directories_land_with_numeric_owners_and_the_rerun_changes_nothing(fleet):
    first = fleet.deploy()
    assert first.returncode == 0, first.output[-2000:]
    before = {}
    for record in fleet.hosts:
        before[record.name] = stat_dirs(fleet, record, DEFAULT_DIRS)
        assert {path: owner_mode for path, (owner_mode, _) in before[record.name].items()} == DEFAULT_DIRS
        assert fleet.ssh(record, "getent passwd 1000 || echo none").strip() == "none"

    second = fleet.deploy()
    assert_no_change_anywhere(second, fleet.hosts)
    for record in fleet.hosts:
        # ctime moves on any chown/chmod, even to the same values: none ran.
        assert stat_dirs(fleet, record, DEFAULT_DIRS) == before[record.name]


def test_drift_on_one_host_is_repaired_there_only(fleet):
    fleet.deploy()
    drifted, other = fleet.hosts
    fleet.ssh(drifted, "chown 0:0 /srv/mlstack/hf-cache && chmod 0700 /srv/mlstack/hf-cache")
    run = fleet.deploy()
    assert run.returncode == 0
    assert run.changed_operations() == [
        ("Host directories | Directory model_cache_dir /srv/mlstack/hf-cache (1000:1000 2775)", [drifted.name])
    ]
    assert stat_dirs(fleet, drifted, ["/srv/mlstack/hf-cache"])["/srv/mlstack/hf-cache"][0] == "1000:1000:2775"


@pytest.mark.heavy
def test_sudo_login_creates_missing_parents_as_roots_and_the_directory_as_configured(fleet):
    data = [
        "--data", "stack_root=/srv/sudo-stack",
        "--data", "ml_env_dir=/srv/sudo-stack/env",
        "--data", "model_cache_dir=/srv/sudo-stack/cache",
        "--data", "compose_project_dir=/srv/deep/a/compose",
        "--data", "compose_project_dir_gid=1000",
        "--data", "compose_project_dir_mode=0710",
    ]
    env = {"MLSTACK_FLEET_USER": "deploy"}
    first = fleet.deploy(*data, env=env)
    assert first.returncode == 0, first.output[-2000:]
    for record in fleet.hosts:
        assert fleet.ssh(record, "id -un", user="deploy").strip() == "deploy"
        owners = {path: fields[0] for path, fields in stat_dirs(
            fleet, record, ["/srv", "/srv/deep", "/srv/deep/a", "/srv/deep/a/compose", "/srv/sudo-stack/cache"]
        ).items()}
        assert owners == {
            "/srv": "0:0:755",  # existed: never touched
            "/srv/deep": "0:0:755",  # missing parents are root's
            "/srv/deep/a": "0:0:755",
            "/srv/deep/a/compose": "0:1000:710",
            "/srv/sudo-stack/cache": "1000:1000:2775",
        }
    assert_no_change_anywhere(fleet.deploy(*data, env=env), fleet.hosts)


def test_bad_host_data_fails_before_any_host_changes(fleet):
    run = fleet.deploy("--data", "stack_root=/srv/never-created", "--data", "ml_env_dri=/srv/x",
                       "--data", "model_cache_dir_uid=-1")
    assert run.returncode != 0
    for record in fleet.hosts:
        assert f"{record.name}: ml_env_dri = '/srv/x': unknown setting (did you mean 'ml_env_dir'?)" in run.output
        assert f"{record.name}: model_cache_dir_uid = -1: expected an integer id from 0 to 4294967294" in run.output
        assert fleet.ssh(record, "test -e /srv/never-created || echo absent").strip() == "absent"
    assert "Traceback" not in run.output


def test_a_file_where_a_directory_belongs_fails_that_host_with_a_clear_error(fleet):
    blocked, other = fleet.hosts
    fleet.ssh(blocked, "mkdir -p /srv/blocked && touch /srv/blocked/compose")
    run = fleet.deploy("--data", "compose_project_dir=/srv/blocked/compose")
    assert run.returncode != 0
    assert "/srv/blocked/compose (compose_project_dir) exists and is not a directory" in run.output
    assert fleet.ssh(blocked, "test -f /srv/blocked/compose && echo file").strip() == "file"
    fleet.ssh(blocked, "rm -r /srv/blocked")


@pytest.mark.parametrize("fleet_name", ["nofleet"])
def test_the_inventory_says_to_bring_the_fleet_up_when_none_is(fleet_name):
    from tasks.fleet.runner import run_deploy

    run = run_deploy("-y", env={"MLSTACK_FLEET": fleet_name})
    assert run.returncode != 0
    assert "rehearsal fleet 'nofleet' is not up: run `make fleet-up`" in run.output


def test_dry_run_reports_the_change_and_changes_nothing(fleet):
    run = fleet.deploy("--dry", "--data", "ml_env_dir=/srv/dry-run-env")
    assert run.returncode == 0, run.output[-2000:]
    planned = {op["name"]: op["hosts_with_change"] for op in run.payload["plan"]
               if op["hosts_with_change"] and op["name"].startswith("Host directories")}
    assert planned == {
        "Host directories | Directory ml_env_dir /srv/dry-run-env (0:0 0755)": sorted(r.name for r in fleet.hosts)
    }
    for record in fleet.hosts:
        assert fleet.ssh(record, "test -e /srv/dry-run-env || echo absent").strip() == "absent"


@pytest.mark.heavy
def test_limit_changes_only_the_named_host(fleet):
    first, second = fleet.hosts
    run = fleet.deploy("--limit", first.name, "--data", "ml_env_dir=/srv/limited-env")
    assert run.returncode == 0, run.output[-2000:]
    changed = run.changed_operations()
    assert ("Host directories | Directory ml_env_dir /srv/limited-env (0:0 0755)", [first.name]) in changed
    assert all(hosts == [first.name] for _, hosts in changed)
    assert fleet.ssh(first, "stat -c %u:%g:%a /srv/limited-env").strip() == "0:0:755"
    assert fleet.ssh(second, "test -e /srv/limited-env || echo absent").strip() == "absent"
