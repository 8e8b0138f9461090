"""What `mlstack prune` keeps and removes on a host, from its releases and what it holds (tasks/prune.py), and
the host program that reads and removes it (files/host/prune.sh), run here on a made-up env store."""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace

import pytest

from tasks.host.ml_env import MlEnvState
from tasks.host.models import ModelCacheState, RepoCacheState
from tasks.host.programs import program
from tasks.host.releases import ReleasesState, new_release
from tasks.prune import EnvSizesFact, HostImages, ImagesFact, kept_releases, needs, plan_prune, prune_options

FOLDER = "models--org--m"
OTHER = "models--org--unmanaged"  # a folder no release names
COMMITS = {name: name * 40 for name in "abcd"}
IMAGES = {name: "sha256:" + name * 64 for name in "abcdef"}
BASE = "sha256:" + "0" * 64


def release(n: int, commit: str, image: str, env: str | None = None):
    made = new_release("shop", str(n) * 64, env if env is not None else f"env-{n:016x}",
                       {FOLDER: COMMITS[commit]}, {"web": f"shop:{n}"}, "s" * 16)
    return replace(made, activated=f"2026-12-0{n}T00:00:00Z", image_ids={"web": IMAGES[image]})


R1, R2, R3, R4 = release(1, "a", "a"), release(2, "b", "b"), release(3, "b", "c"), release(4, "c", "d")


def state(*releases, current=None) -> ReleasesState:
    return ReleasesState({r.id: r for r in releases}, current if current is not None else releases[-1].id)


def env_state(*envs: str, active: str | None = None, mounted=frozenset()) -> MlEnvState:
    return MlEnvState(active=active, envs={env: 0 for env in envs}, leftovers=(), free_bytes=0, arch="x86_64",
                      image_id=BASE, mounted=mounted)


def repo(*snapshots: str, blobs: dict | None = None, links: dict | None = None, refs: dict | None = None):
    """A folder whose snapshot X links to blob X*40 (and whatever LINKS adds), each blob 10 bytes."""
    links = {**{f"{COMMITS[s]}/file": f"../../blobs/{s * 40}" for s in snapshots}, **(links or {})}
    blobs = blobs or {target.rsplit("/", 1)[1]: 10 for target in links.values()}
    return RepoCacheState(blobs, frozenset(COMMITS[s] for s in snapshots), links, refs or {}, frozenset(), {}, ())


def test_the_current_release_and_the_most_recently_activated_others_are_kept():
    four = state(R1, R2, R3, R4)
    assert [r.id for r in kept_releases(four, 3)[0]] == [R2.id, R3.id, R4.id]
    assert [r.id for r in kept_releases(four, 3)[1]] == [R1.id]
    assert kept_releases(four, 1) == ([R4], [R1, R2, R3])
    assert kept_releases(four, 10) == ([R1, R2, R3, R4], [])
    # after a rollback to R2, it is current: kept, with the most recently activated of the others
    assert kept_releases(state(R1, R3, R4, R2, current=R2.id), 2) == ([R4, R2], [R1, R3])
    # no current release: what runs is not known, nothing goes
    assert kept_releases(ReleasesState({R1.id: R1, R2.id: R2}, None), 1) == ([R1, R2], [])


def test_a_host_loses_what_only_the_releases_beyond_keep_used():
    held = state(R1, R2, R3, R4)
    cache = ModelCacheState({FOLDER: repo("a", "b", "c", "d", refs={"v1": COMMITS["a"], "main": COMMITS["c"]}),
                             OTHER: repo("a")}, 0)
    images = HostImages({**{IMAGES[n]: 100 for n in "abcd"}, BASE: 90}, frozenset({IMAGES["d"]}))
    envs = env_state("env-0000000000000001", "env-0000000000000002", "env-0000000000000003",
                     "env-0000000000000004", "env-00000000000000ff", active="env-0000000000000004")
    plan = plan_prune(held, 2, envs, cache, images)
    assert plan.kept == (R3.id, R4.id) and plan.removed == (R1.id, R2.id)
    # every env but the active one and the kept releases' (a stray env no release names goes too)
    assert plan.envs == ("env-0000000000000001", "env-0000000000000002", "env-00000000000000ff")
    # snapshot a (R1's) and d (no release's) go with their refs and blobs; b is R3's and c R4's; the folder no
    # release names is not looked at
    assert [(s.folder, s.commit, s.refs, s.blobs, s.bytes) for s in plan.snapshots] == [
        (FOLDER, COMMITS["a"], ("v1",), ("a" * 40,), 10), (FOLDER, COMMITS["d"], (), ("d" * 40,), 10)]
    assert plan.folders == (FOLDER,)
    # R1's and R2's images; R3's (kept) and the base image stay
    assert plan.images == (IMAGES["a"], IMAGES["b"])
    assert needs(plan, held, envs) == {"envs": ["env-0000000000000003", "env-0000000000000004"],
                                       "folders": [FOLDER], "models": {FOLDER: [COMMITS["b"], COMMITS["c"]]},
                                       "images": ["shop:3", "shop:4"]}


def test_what_a_kept_release_a_container_or_the_runtime_uses_stays_even_when_a_removed_release_named_it():
    shared = replace(release(1, "a", "a", env="env-0000000000000003"), image_ids={"web": IMAGES["c"], "job": BASE,
                                                                                   "old": IMAGES["e"]})
    held = state(shared, R2, R3)
    cache = ModelCacheState({FOLDER: repo("a", "b", links={f"{COMMITS['a']}/shared": f"../../blobs/{'b' * 40}"})}, 0)
    images = HostImages({IMAGES["c"]: 1, BASE: 1, IMAGES["e"]: 1, IMAGES["b"]: 1}, frozenset({IMAGES["e"]}))
    envs = env_state("env-0000000000000001", "env-0000000000000002", "env-0000000000000003",
                     active="env-0000000000000001", mounted=frozenset({("envs/env-0000000000000002", "other")}))
    plan = plan_prune(held, 1, envs, cache, images)
    assert plan.removed == (shared.id, R2.id)
    assert plan.envs == ()  # active, mounted by another project, R3's
    assert [(s.commit, s.blobs) for s in plan.snapshots] == [(COMMITS["a"], ("a" * 40,))]  # b's blob: R3's snapshot
    assert plan.images == (IMAGES["b"],)  # c: R3's; the base image; e: a container's
    assert plan.notes == ("env env-0000000000000002 stays: a container of project other mounts it",
                          f"image {BASE[:19]} stays: it is the runtime base image (ml_env_base_image)",
                          f"image {IMAGES['e'][:19]} stays: a container uses it")


def test_nothing_goes_without_a_current_release_or_with_nothing_beyond_keep():
    cache = ModelCacheState({FOLDER: repo("a", "b")}, 0)
    images = HostImages({IMAGES["a"]: 1, IMAGES["b"]: 1})
    envs = env_state("env-0000000000000001", "env-0000000000000002", active="env-0000000000000002")
    unknown = plan_prune(ReleasesState({R1.id: R1, R2.id: R2}, None), 1, envs, cache, images)
    assert (unknown.removed, unknown.envs, unknown.snapshots, unknown.images) == ((), (), (), ())
    assert unknown.notes == ("no current release is recorded: no release is removed",)
    both = plan_prune(state(R1, R2), 3, envs, cache, images)
    assert (both.removed, both.envs, both.snapshots, both.images) == ((), (), (), ())


def test_names_the_host_reports_are_checked():
    images = ImagesFact().process([
        f"image {IMAGES['a']} 120 {IMAGES['e']} {IMAGES['f']}", f"image {IMAGES['b']} 12x", "image ../etc 1",
        f"image {IMAGES['c']} 5 not-a-layer", f"container {IMAGES['a']}", "container $(reboot)", ""])
    assert images.sizes == {IMAGES["a"]: 120, IMAGES["c"]: 5} and images.in_use == frozenset({IMAGES["a"]})
    assert images.layers == {IMAGES["a"]: (IMAGES["e"], IMAGES["f"]), IMAGES["c"]: ()}
    assert EnvSizesFact().process(["env env-0123456789abcdef 42", "env ../../etc 1", "env env-0123456789abcdef0 1",
                                   "env env-1111111111111111 -1"]) == {"env-0123456789abcdef": 42}


def test_an_images_size_is_what_it_does_not_share_with_an_image_that_stays():
    base, app, other = (IMAGES["e"],), (IMAGES["e"], IMAGES["f"]), (IMAGES["e"], IMAGES["d"])
    images = HostImages({BASE: 100, IMAGES["a"]: 130, IMAGES["b"]: 125, IMAGES["c"]: 140}, frozenset(),
                        {BASE: base, IMAGES["a"]: app, IMAGES["b"]: other, IMAGES["c"]: (IMAGES["c"],)})
    assert images.freed(IMAGES["a"], {IMAGES["a"]}) == (30, True)  # its layer over the base image
    assert images.freed(IMAGES["c"], {IMAGES["c"]}) == (140, True)  # shares nothing
    # the base goes too: a and b share only a first part whose size no staying image tells
    assert images.freed(IMAGES["a"], {IMAGES["a"], BASE}) == (130, False)


def test_the_options_come_checked_from_the_environment(monkeypatch):
    monkeypatch.setenv("MLSTACK_PRUNE", '{"keep": 2, "dry": true}')
    assert prune_options() == (2, True)
    monkeypatch.delenv("MLSTACK_PRUNE")
    assert prune_options() == (3, False)
    for bad in ('{"keep": 0}', '{"keep": "2"}', '{"keep": true}', '{"dry": "yes"}', "[", "[1]"):
        monkeypatch.setenv("MLSTACK_PRUNE", bad)
        with pytest.raises(ValueError, match="keep ≥ 1"):
            prune_options()


def sh(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True)


def test_env_sizes_count_only_files_whose_last_link_outside_the_store_goes(tmp_path):
    (tmp_path / "objects").mkdir()
    for name, size in (("shared", 100), ("only-a", 10), ("only-b", 20), ("a-and-b", 40)):
        (tmp_path / "objects" / name).write_bytes(b"x" * size)
    trees = {"env-000000000000000a": ("shared", "only-a", "a-and-b"), "env-000000000000000b": ("only-b", "a-and-b"),
             "env-000000000000000c": ("shared",)}
    for env, names in trees.items():
        (tmp_path / "envs" / env / "lib").mkdir(parents=True)
        for name in names:
            os.link(tmp_path / "objects" / name, tmp_path / "envs" / env / "lib" / name)
    os.link(tmp_path / "objects" / "only-a", tmp_path / "envs" / "env-000000000000000a" / "twice")  # a second link
    result = sh(program("prune.sh", "env-sizes", str(tmp_path), "env-000000000000000a", "env-000000000000000b"))
    assert result.returncode == 0, result.stderr
    # only-a (both its links go) and a-and-b (with the first env naming it); shared is env c's too
    assert EnvSizesFact().process(result.stdout.splitlines()) == {"env-000000000000000a": 50,
                                                                  "env-000000000000000b": 20}


def test_remove_refuses_a_path_that_could_leave_its_directory(tmp_path):
    (tmp_path / "repo/snapshots/x").mkdir(parents=True)
    (tmp_path / "keep").write_text("")
    for path in ("../keep", "/etc", "snapshots/../../keep", ""):
        result = sh(program("prune.sh", "remove", str(tmp_path / "repo"), "snapshots/x", path))
        assert result.returncode == 2 and "refusing" in result.stderr
    assert (tmp_path / "repo/snapshots/x").is_dir() and (tmp_path / "keep").exists()
    assert sh(program("prune.sh", "remove", str(tmp_path / "repo"), "snapshots/x")).returncode == 0
    assert not (tmp_path / "repo/snapshots/x").exists() and (tmp_path / "repo/snapshots").is_dir()
