"""The control node's caches trimmed to what the hosts still need (tasks/control/trim.py), on made-up caches laid
out as the deploy writes them."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tasks.control.trim import Needs, apply_trims, env_cache_trims, hf_cache_trims, image_cache_trims, plan_trims

KEPT, GONE, OTHER = "env-000000000000000a", "env-000000000000000b", "env-000000000000000c"
OBJECT = {name: name * 64 + "-644" for name in "123"}


def env_cache(root: Path) -> Path:
    """Envs KEPT (objects 1, 2) and GONE (objects 2, 3), each with artifact, manifest, tree and a recipe record."""
    for env, objects in ((KEPT, "12"), (GONE, "23")):
        (root / "trees").mkdir(parents=True, exist_ok=True)
        (root / "recipes").mkdir(exist_ok=True)
        (root / f"{env}.tar.gz").write_bytes(b"a" * 1000)
        (root / f"{env}.json").write_text("{}")
        entries = [[f"lib/{name}", "f", 0o644, OBJECT[name], 10] for name in objects]
        (root / "trees" / f"{env}.json").write_text(json.dumps({"entries": entries}))
        (root / "recipes" / f"recipe-{env[-16:]}.json").write_text(json.dumps({"env": env}))
    (root / "objects").mkdir()
    for name in OBJECT.values():
        (root / "objects" / name).write_bytes(b"o" * 10)
    (root / "base-images").mkdir()
    (root / "base-images" / f"{'0' * 64}.json").write_text("{}")
    (root / "notes.txt").write_text("not ours")
    return root


def test_the_env_cache_loses_the_envs_no_host_keeps_with_the_objects_only_they_use(tmp_path):
    root = env_cache(tmp_path / "ml-env")
    (trim,) = env_cache_trims(root, {KEPT, OTHER})
    assert trim.what == f"env {GONE}" and trim.detail == "artifact, manifest, tree, 1 recipe record(s), 1 object(s)"
    # the tree first (it is written once its objects are there), the artifact last
    assert [path.relative_to(root).as_posix() for path in trim.paths] == [
        f"trees/{GONE}.json", f"recipes/recipe-{GONE[-16:]}.json", f"objects/{OBJECT['3']}", f"{GONE}.json",
        f"{GONE}.tar.gz"]
    assert trim.bytes == sum(path.stat().st_size for path in trim.paths)
    assert apply_trims([trim]) == []
    left = sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())
    assert left == [f"base-images/{'0' * 64}.json", f"{KEPT}.json", f"{KEPT}.tar.gz", "notes.txt",
                    f"objects/{OBJECT['1']}", f"objects/{OBJECT['2']}", f"recipes/recipe-{KEPT[-16:]}.json",
                    f"trees/{KEPT}.json"]
    assert env_cache_trims(root, {KEPT}) == [] and env_cache_trims(tmp_path / "none", set()) == []


def test_the_image_cache_loses_the_archives_of_images_no_kept_release_runs(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    names = ["shop-00000000000000aa.tar.gz", "shop-00000000000000aa-without-1111111111111111.tar.gz",
             "shop-00000000000000bb.tar.gz", "shop-00000000000000bb-without-1111111111111111.tar.gz",
             "pulled-0123456789abcdef.tar.gz", "pulled-fedcba9876543210.tar.gz",
             "base-62d429eab1de7d68.tar.gz", "base-62d429eab1de7d68-without-1111111111111111.tar.gz",
             "env-digest.salt", ".shop-00000000000000cc.tar.gz.x1.partial", "notes.tar.gz"]
    for name in names:
        (root / name).write_bytes(b"x" * 10)
    kept = {"shop:00000000000000aa", "registry.corp/tools:1 (0123456789ab)", "redis:7"}
    trims = image_cache_trims(root, kept)
    assert [(trim.what, trim.detail) for trim in trims] == [
        ("archive pulled-fedcba9876543210.tar.gz", ""),
        ("archive shop-00000000000000bb.tar.gz", "and 1 partial copy")]
    assert [path.name for path in trims[1].paths] == ["shop-00000000000000bb-without-1111111111111111.tar.gz",
                                                      "shop-00000000000000bb.tar.gz"]  # the partial copy first
    assert apply_trims(trims) == []
    assert sorted(path.name for path in root.iterdir()) == sorted(set(names) - {
        "pulled-fedcba9876543210.tar.gz", "shop-00000000000000bb.tar.gz",
        "shop-00000000000000bb-without-1111111111111111.tar.gz"})


def hf_repo(root: Path, folder: str, snapshots: dict[str, list[str]]) -> Path:
    repo = root / folder
    for commit, blobs in snapshots.items():
        for index, blob in enumerate(blobs):
            (repo / "blobs").mkdir(parents=True, exist_ok=True)
            (repo / "blobs" / blob).write_bytes(b"b" * 100)
            link = repo / "snapshots" / commit / ("sub/" if index else "") / f"file{index}"
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(("../" * (3 if index else 2)) + f"blobs/{blob}", link)
        (repo / "trees").mkdir(exist_ok=True)
        (repo / "trees" / f"{commit}.json").write_text("[]")
    return repo


def test_the_hf_cache_loses_snapshots_no_kept_release_uses_only_in_folders_a_release_names(tmp_path):
    old, new, listed = "a" * 40, "b" * 40, "c" * 40
    shared, only_old, only_new = "1" * 40, "2" * 64, "3" * 40
    repo = hf_repo(tmp_path, "models--org--m", {old: [shared, only_old], new: [shared, only_new]})
    (repo / "trees" / f"{listed}.json").write_text("[]")  # resolved once, never downloaded
    (repo / "refs").mkdir()
    (repo / "refs" / "v1").write_text(old)
    (repo / "refs" / "main").write_text(new)
    hf_repo(tmp_path, "models--org--unmanaged", {old: [only_old]})
    trims = hf_cache_trims(tmp_path, {"models--org--m": {new}})
    assert [(trim.what, trim.detail) for trim in trims] == [(f"model models--org--m@{old[:12]}", "1 file(s)"),
                                                           (f"model models--org--m@{listed[:12]}",
                                                            "tree listing only")]
    assert [path.relative_to(repo).as_posix() for path in trims[0].paths] == [
        f"snapshots/{old}", "refs/v1", f"trees/{old}.json", f"blobs/{only_old}"]
    assert apply_trims(trims) == []
    assert sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*") if not path.is_dir()) == [
        f"models--org--m/blobs/{shared}", f"models--org--m/blobs/{only_new}", "models--org--m/refs/main",
        f"models--org--m/snapshots/{new}/file0", f"models--org--m/snapshots/{new}/sub/file1",
        f"models--org--m/trees/{new}.json", f"models--org--unmanaged/blobs/{only_old}",
        f"models--org--unmanaged/snapshots/{old}/file0", f"models--org--unmanaged/trees/{old}.json"]


def test_the_needs_of_every_host_are_merged_before_anything_is_trimmed(tmp_path):
    env_cache(tmp_path / "ml-env")
    needs = Needs.merged([{"envs": [KEPT], "folders": ["models--org--m"], "models": {"models--org--m": ["a" * 40]},
                           "images": ["shop:1"]},
                          {"envs": [GONE], "folders": ["models--org--m", "models--org--n"],
                           "models": {"models--org--m": ["b" * 40], "models--org--n": []}, "images": ["shop:2"]}])
    assert needs == Needs({KEPT, GONE}, {"shop:1", "shop:2"},
                          {"models--org--m": {"a" * 40, "b" * 40}, "models--org--n": set()})
    assert plan_trims({"ml_env": {tmp_path / "ml-env"}, "images": {tmp_path / "none"}}, needs) == []
