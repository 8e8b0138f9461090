"""Directory planning: which parents each directory creates, and the commands from the facts."""

import pytest

from tasks.config import DirectorySpec
from tasks.host.directories import DirectoriesFact, PathState, directory_commands, parents_to_create, watched_paths
from tasks.host.failure import HostProblem

ROOT = DirectorySpec("stack_root", "/srv/mlstack", 0, 0, 0o755)
CACHE = DirectorySpec("model_cache_dir", "/srv/mlstack/hf-cache", 1000, 1000, 0o2775)
DEEP = DirectorySpec("compose_project_dir", "/data/a/b/compose", 0, 0, 0o750)
DEEP_SIBLING = DirectorySpec("ml_env_dir", "/data/a/env", 0, 0, 0o755)


def test_configured_ancestors_are_left_to_their_own_entry():
    assert parents_to_create([CACHE, ROOT]) == {"/srv/mlstack": ["/srv"], "/srv/mlstack/hf-cache": []}


def test_a_shared_missing_parent_is_created_once_by_the_first_directory_in_path_order():
    assert parents_to_create([DEEP_SIBLING, DEEP]) == {
        "/data/a/b/compose": ["/data", "/data/a", "/data/a/b"],
        "/data/a/env": [],
    }


def test_one_fact_watches_every_directory_and_ancestor():
    assert watched_paths([CACHE, DEEP]) == (
        "/data", "/data/a", "/data/a/b", "/data/a/b/compose", "/srv", "/srv/mlstack", "/srv/mlstack/hf-cache",
    )


def test_missing_parents_are_roots_and_the_directory_gets_its_numeric_owner_and_mode():
    states = {"/data": PathState(0, 0, 0o755, True)}
    deep_cache = DirectorySpec("model_cache_dir", "/data/a/b/cache", 1000, 1000, 0o2775)
    assert directory_commands(deep_cache, ["/data", "/data/a", "/data/a/b"], states) == [
        "mkdir -m 0755 /data/a",
        "mkdir -m 0755 /data/a/b",
        "mkdir -m 2775 /data/a/b/cache && chown 1000:1000 /data/a/b/cache && chmod 2775 /data/a/b/cache",
    ]


@pytest.mark.parametrize("parent, who", [
    (PathState(1000, 0, 0o755, True), "owned by uid 1000"),
    (PathState(0, 0, 0o1777, True), "writable by every user"),
    (PathState(0, 1000, 0o775, True), "writable by group 1000"),
])
def test_a_parent_another_user_can_write_fails_the_host_before_anything_is_created(parent, who):
    with pytest.raises(HostProblem, match=rf"^/srv, which holds model_cache_dir /srv/mlstack/hf-cache, is {who}: "
                                          "root would follow the links they can plant there"):
        directory_commands(CACHE, [], {"/srv": parent, "/srv/mlstack": PathState(0, 0, 0o755, True)})


def test_a_parent_writable_by_the_root_group_only_is_roots():
    assert directory_commands(CACHE, [], {"/srv": PathState(0, 0, 0o775, True)}) == [
        "mkdir -m 2775 /srv/mlstack/hf-cache && chown 1000:1000 /srv/mlstack/hf-cache "
        "&& chmod 2775 /srv/mlstack/hf-cache"]


def test_a_directory_in_place_with_a_uid_that_has_no_passwd_entry_needs_nothing():
    states = {"/srv/mlstack/hf-cache": PathState(1000, 1000, 0o2775, True)}
    assert directory_commands(CACHE, [], states) == []


def test_existing_parents_are_never_touched_and_drift_is_repaired_precisely():
    states = {"/srv": PathState(0, 0, 0o700, True), "/srv/mlstack/hf-cache": PathState(1000, 0, 0o775, True)}
    assert directory_commands(CACHE, ["/srv"], states) == [
        "chown 1000:1000 /srv/mlstack/hf-cache",
        "chmod 2775 /srv/mlstack/hf-cache",
    ]


def test_paths_are_shell_quoted():
    spec = DirectorySpec("stack_root", "/srv/my stack", 0, 0, 0o755)
    assert (directory_commands(spec, [], {"/srv/my stack": PathState(0, 0, 0o700, True)})
            == ["chmod 0755 '/srv/my stack'"])


def test_a_file_where_a_directory_belongs_is_an_error_naming_the_setting():
    with pytest.raises(HostProblem, match=r"/srv/mlstack \(stack_root\) exists and is not a directory"):
        directory_commands(ROOT, [], {"/srv/mlstack": PathState(0, 0, 0o644, False)})


def test_path_states_fact_parses_numeric_stat_output():
    fact = DirectoriesFact()
    assert "stat -L -c '%u %g %f %n' -- /srv '/srv/my stack'" in fact.command(("/srv", "/srv/my stack"))
    assert fact.process(["1000 1000 45fd /srv/my stack", "0 0 81a4 /srv/file"]) == {
        "/srv/my stack": PathState(1000, 1000, 0o2775, True),
        "/srv/file": PathState(0, 0, 0o644, False),
    }
