"""Owners below the managed directories: the decision, the probe program on scratch trees, and the host
programs that work below a directory (cache_dirs.sh, receive_file.sh, publish_snapshot.sh) against a
loop that swaps a link in while they run, as another user who owns that directory could."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from pyinfra.api import FactBase

from tasks.config import DEFAULTS
from tasks.host.failure import HostProblem
from tasks.host.owners import Entry, OwnersFact, Tree, check, owner_problems, probe_part, trees
from tasks.host.probe import HostProbe, ProbePart
from tasks.host.programs import program
from tasks.validation import validate_host

ME = os.getuid()
OTHER = ME + 1  # a uid that owns nothing here: everything made here is foreign to it
ENV = Tree("ml_env_dir", "/srv/mlstack/ml-env", 0, 0, True)
CACHE = Tree("model_cache_dir", "/srv/mlstack/hf-cache", 1000, 1000, True)
COMPOSE = Tree("compose_project_dir", "/srv/mlstack/compose", 0, 0, False)
RUNS = 40  # runs of a program against the swap loop: each old program lost within 10


class AfterFact(FactBase):
    """A part after the owners part: it must arrive whole too."""

    def command(self) -> str:
        return "echo after"

    def process(self, output: list[str]) -> list[str]:
        return output


def config_of(**settings):
    config, problems = validate_host("gpu-01", {**DEFAULTS, "stack": "reranker", **settings})
    assert problems == []
    return config


def test_every_tree_the_deploy_works_in_is_checked_as_the_uid_it_works_there_as():
    config = config_of(model_cache_dir_uid=1000, model_cache_dir_gid=1000, model_cache_dir_mode="2775")
    assert trees(config) == (ENV, CACHE, COMPOSE, Tree("stack_root", "/srv/mlstack/releases", 0, 0, False))
    # Root's trees allow no group but root's; the cache's worker, also its own group (mode 2775).
    assert probe_part(config).arguments["trees"] == (
        ("/srv/mlstack/ml-env", 0, 0), ("/srv/mlstack/hf-cache", 1000, 1000), ("/srv/mlstack/compose", 0, 0),
        ("/srv/mlstack/releases", 0, 0))


def test_a_tree_with_nothing_found_is_fine():
    assert owner_problems((ENV, CACHE), {}) == []


def test_content_of_another_uid_where_root_works_fails_with_the_path_the_uid_and_what_to_run():
    root_cache = Tree("model_cache_dir", "/srv/mlstack/hf-cache", 0, 0, True)
    entry = Entry(1000, 1000, 0o755, "d", "/srv/mlstack/hf-cache/hub/models--a--b")
    assert owner_problems((ENV, root_cache), {1: entry}) == [
        "/srv/mlstack/hf-cache/hub/models--a--b (in model_cache_dir /srv/mlstack/hf-cache) belongs to uid 1000, but "
        "the deploy works there as root, and that user could swap a link in where the deploy works; on the host, "
        "run `chown -R 0:0 /srv/mlstack/hf-cache`, or set model_cache_dir_uid = 1000 (and model_cache_dir_gid to "
        "its group) so that the deploy works there as that user; nothing on this host was changed"]


def test_the_compose_project_can_only_be_made_roots_again():
    (problem,) = owner_problems((COMPOSE,), {0: Entry(1000, 0, 0o755, "d", "/srv/mlstack/compose/data")})
    assert "belongs to uid 1000" in problem and "run `chown -R 0:0 /srv/mlstack/compose`;" in problem
    assert "compose_project_dir_uid" not in problem  # settings refuse a non-root compose project


def test_a_top_of_another_uid_fails_but_a_root_top_is_what_the_deploy_chowns():
    (problem,) = owner_problems((CACHE,), {0: Entry(1001, 1001, 0o2775, "d", CACHE.path)})
    assert problem.startswith("/srv/mlstack/hf-cache (in model_cache_dir /srv/mlstack/hf-cache) belongs to uid 1001")
    (problem,) = owner_problems((CACHE,), {0: Entry(0, 0, 0o644, "f", f"{CACHE.path}/hub/x")})
    assert "belongs to uid 0, but the deploy works there as uid 1000, which cannot change it" in problem
    assert "run `chown -R 1000:1000 /srv/mlstack/hf-cache`;" in problem and "model_cache_dir_uid =" not in problem


def test_a_directory_others_can_write_fails_with_who_and_the_chmod():
    (every, group) = owner_problems((ENV, CACHE), {0: Entry(0, 0, 0o1777, "d", f"{ENV.path}/objects"),
                                                   1: Entry(1000, 1001, 0o775, "d", f"{CACHE.path}/hub")})
    assert "/srv/mlstack/ml-env/objects (in ml_env_dir /srv/mlstack/ml-env) is a directory every user can write " \
           "(mode 1777), and the deploy works there as root" in every
    assert "run `chmod go-w /srv/mlstack/ml-env/objects`" in every
    assert "is a directory group 1001 can write (mode 0775), and the deploy works there as uid 1000" in group


def test_the_step_fails_the_host_with_every_problem():
    config = config_of()
    assert check.__wrapped__(config, {}) is True
    with pytest.raises(HostProblem, match=r"ml-env/x .* belongs to uid 7.*compose/y .* belongs to uid 8"):
        check.__wrapped__(config, {0: Entry(7, 7, 0o644, "f", "/srv/mlstack/ml-env/x"),
                                   2: Entry(8, 8, 0o644, "f", "/srv/mlstack/compose/y")})


def probe(*tree_args) -> dict[int, Entry]:
    """The owners part's value for TREE_ARGS, read through the host probe as a deploy reads it (framed, with
    the other parts around it)."""
    probe = HostProbe()
    parts = (ProbePart("owners", OwnersFact, {"trees": tree_args}), ProbePart("after", AfterFact))
    result = subprocess.run(["/bin/sh", "-c", probe.command(parts)], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    values = probe.process(result.stdout.splitlines())
    assert values["after"] == ["after"]
    return values["owners"]


def test_the_probe_finds_the_first_foreign_entry_of_each_tree_and_skips_a_missing_one(tmp_path):
    mine, other = tmp_path / "mine", tmp_path / "other"
    (mine / "hub" / "models--a").mkdir(parents=True)
    (mine / "hub" / "models--a" / "blob").write_text("x")
    other.mkdir()
    (other / "f").write_text("x")
    (other / "f").chmod(0o644)
    found = probe((str(mine), ME, ME), (str(tmp_path / "none"), ME, ME), (str(other), OTHER, OTHER))
    # The top itself may be root's whoever works there (root alone can add to it then).
    assert found == {2: Entry(ME, os.getgid(), 0o644, "f", str(other / "f")) if ME == 0
                     else Entry(ME, os.getgid(), other.stat().st_mode & 0o7777, "d", str(other))}


def test_the_probe_finds_an_open_directory_and_a_name_with_a_newline_but_follows_no_link(tmp_path):
    tree, outside = tmp_path / "tree", tmp_path / "outside"
    outside.mkdir()
    outside.chmod(0o777)
    tree.mkdir()
    (tree / "link").symlink_to(outside)  # its target is no business of the probe's
    assert probe((str(tree), ME, ME)) == {}
    odd = tree / "a\nb"
    odd.mkdir()
    odd.chmod(0o1777)
    (entry,) = probe((str(tree), ME, ME)).values()
    assert (entry.path, entry.mode, entry.kind) == (str(odd), 0o1777, "d")


def test_the_probe_allows_the_workers_own_group_only(tmp_path):
    shared = tmp_path / "tree" / "shared"
    shared.mkdir(parents=True)
    group = 1000 if ME == 0 else os.getgid()  # root's own group may always write: another one, as root
    os.chown(shared, -1, group)
    shared.chmod(0o2775)
    assert probe((str(tmp_path / "tree"), ME, group)) == {}
    assert probe((str(tmp_path / "tree"), ME, group + 1))[0].path == str(shared)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a root-owned top over content of another uid")
def test_a_root_top_over_content_of_its_worker_is_fine(tmp_path):
    (tmp_path / "top" / "hub").mkdir(parents=True)
    os.chown(tmp_path / "top" / "hub", 1000, 1000)
    assert probe((str(tmp_path / "top"), 1000, 1000)) == {}
    assert probe((str(tmp_path / "top"), 0, 0))[0] == Entry(1000, 1000, 0o755, "d", str(tmp_path / "top" / "hub"))


SWAPPER = """
import ctypes, os, sys
renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
real, spare, target = sys.argv[1:4]
n = 0
while True:
    # Keep one of the two names a link to TARGET, the other what the program made, and exchange them.
    if not os.path.islink(real) and not os.path.islink(spare):
        if os.path.lexists(spare):
            n += 1
            os.rename(spare, f"{spare}.{n}")
        os.symlink(target, spare)
    renameat2(-100, real.encode(), -100, spare.encode(), 2)  # RENAME_EXCHANGE: both names always there
"""


@contextmanager
def swapping(real: Path, target: Path):
    """A loop that keeps exchanging REAL and a link to TARGET, as the owner of REAL's directory could."""
    spare = real.with_name(real.name + ".swap")
    loop = subprocess.Popen([sys.executable, "-c", SWAPPER, str(real), str(spare), str(target)])
    try:
        yield
    finally:
        loop.kill()
        loop.wait()


def decoy(tmp_path: Path, kind: str = "d") -> Path:
    """Root's (here: the test's) 0700 directory or 0600 file outside the tree, which must never change."""
    path = tmp_path / "decoy"
    if kind == "d":
        path.mkdir(mode=0o700)
    else:
        path.write_text("decoy")
        path.chmod(0o600)
    return path


def test_cache_dirs_never_chmods_through_a_link_swapped_in_while_it_runs(tmp_path):
    repo = tmp_path / "cache" / "hub" / "models--a--b"
    (repo / "blobs").mkdir(parents=True)
    kept = decoy(tmp_path)
    command = program("cache_dirs.sh", "0755", repo.parent, repo, repo / "blobs")
    refused = 0
    with swapping(repo / "blobs", kept):
        for _ in range(RUNS):
            refused += subprocess.run(["/bin/sh", "-c", command], capture_output=True).returncode != 0
            assert kept.stat().st_mode & 0o7777 == 0o700
    assert refused > 0  # the swaps came while it worked


def test_cache_dirs_makes_the_folders_and_replaces_a_link_or_file_standing_there(tmp_path):
    repo = tmp_path / "cache" / "hub" / "models--a--b"
    repo.mkdir(parents=True)
    (repo / "refs").symlink_to(decoy(tmp_path))
    (repo / "blobs").write_text("x")
    result = subprocess.run(["/bin/sh", "-c", program("cache_dirs.sh", "2755", repo.parent, repo, repo / "refs",
                                                      repo / "blobs", repo / "snapshots")], capture_output=True)
    assert result.returncode == 0, result.stderr
    for path in (repo.parent, repo, repo / "refs", repo / "blobs", repo / "snapshots"):
        assert not path.is_symlink() and path.stat().st_mode & 0o7777 == 0o2755
    assert (tmp_path / "decoy").stat().st_mode & 0o7777 == 0o700


def test_receive_file_never_chmods_through_a_link_swapped_in_after_the_write(tmp_path):
    kept = decoy(tmp_path, "f")
    dest = tmp_path / "blobs" / "x.incoming"
    dest.parent.mkdir()
    command = program("receive_file.sh", dest, "0644")
    with swapping(dest, kept):
        for _ in range(RUNS):
            subprocess.run(["/bin/sh", "-c", command], input=b"data", capture_output=True)
            assert kept.stat().st_mode & 0o7777 == 0o600 and kept.read_text() == "decoy"


def test_receive_file_writes_a_new_file_with_its_mode_and_refuses_other_modes(tmp_path):
    for mode in ("0644", "0600"):
        dest = tmp_path / mode
        result = subprocess.run(["/bin/sh", "-c", program("receive_file.sh", dest, mode)], input=b"data",
                                capture_output=True)
        assert result.returncode == 0, result.stderr
        assert dest.read_bytes() == b"data" and f"{dest.stat().st_mode & 0o7777:04o}" == mode
    result = subprocess.run(["/bin/sh", "-c", program("receive_file.sh", tmp_path / "x", "0755")], input="",
                            capture_output=True, text=True)
    assert result.returncode == 2 and "mode 0755: expected read/write bits only" in result.stderr
    assert not (tmp_path / "x").exists()


def test_a_ref_is_never_written_through_a_link_planted_at_its_temporary_name(tmp_path):
    kept = decoy(tmp_path, "f")
    repo = tmp_path / "hub" / "models--a--b"
    (repo / "refs").mkdir(parents=True)
    tmp = repo / "refs" / "main.tmp"
    # Plants the link again and again: the program removes it, then writes that name.
    planter = subprocess.Popen([sys.executable, "-c", "import os, sys\nwhile True:\n    try:\n"
                                "        os.symlink(sys.argv[1], sys.argv[2])\n    except OSError:\n        pass",
                                str(kept), str(tmp)])
    try:
        for _ in range(RUNS):
            subprocess.run(["/bin/sh", "-c", program("publish_snapshot.sh", "ref", repo, "main", "c" * 40)],
                           capture_output=True)
            assert kept.read_text() == "decoy"
    finally:
        planter.kill()
        planter.wait()
