"""The env store: trees and objects on the control node, the transfer plan, and the host's receive program
(files/host/env_store.sh, run here on this machine's GNU tar and coreutils) making envs from streams."""

import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from tasks.control.builder import BaseImage
from tasks.control.env_artifact import repack_user_site
from tasks.control.env_store import (
    Entry,
    env_tree,
    host_tree,
    objects_tar,
    plan_transfer,
    read_tree,
    transfer_stream,
    tree_drift,
    tree_objects,
)
from tasks.host.ml_env import ODD, MlEnvFact, plan_env
from tasks.host.programs import program

SITE = ".local/lib/python3.11/site-packages"
REQUIREMENTS = "pyyaml\n"
BIG = os.urandom(300_000)  # a file both envs share: sent once


def user_site(version: str, extra: dict[str, bytes] | None = None) -> list[bytes]:
    """A user site as `get_archive('/root/.local')` streams it: PyYAML at VERSION, a shared big file."""
    buffer = io.BytesIO()
    files = {
        f"{SITE}/yaml/__init__.py": f"__version__ = {version!r}\n".encode(),
        f"{SITE}/yaml/big.bin": BIG,
        f"{SITE}/yaml/__pycache__/util.cpython-311.pyc": b"\x00pyc",
        f"{SITE}/PyYAML-{version}.dist-info/METADATA": f"Name: PyYAML\nVersion: {version}\n".encode(),
        f"{SITE}/PyYAML-{version}.dist-info/top_level.txt": b"yaml\n",
        ".local/bin/tool": b"#!/bin/sh\n",
        **(extra or {}),
    }
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        made = set()
        for name, data in files.items():
            parts = name.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(parts[:depth])
                if folder not in made:
                    made.add(folder)
                    info = tarfile.TarInfo(folder)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    archive.addfile(info)
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755 if name.endswith("tool") else 0o644
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo(".local/bin/yaml")
        link.type, link.linkname = tarfile.SYMTYPE, "tool"
        archive.addfile(link)
    return [buffer.getvalue()]


def built(cache: Path, version: str, extra=None):
    manifest = repack_user_site(user_site(version, extra), cache, REQUIREMENTS, "sha256:aa", "linux/amd64")
    return manifest.env_id, env_tree(cache, manifest.env_id, cache / f"{manifest.env_id}.tar.gz")


def store(tmp_path: Path) -> Path:
    host = tmp_path / "host"
    (host / "envs").mkdir(parents=True, exist_ok=True)
    (host / "incoming").mkdir(exist_ok=True)
    return host


def run(host: Path, *args, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", program("env_store.sh", args[0], host, *args[1:])], input=stdin,
                          capture_output=True)


def present(host: Path) -> set[str]:
    return set(run(host, "list").stdout.decode().split())


def receive(host: Path, cache: Path, env: str, tree, held=None, mark="0badc0de", damage=None):
    """ENV made on HOST from TREE, its manifest (`receive`), or HELD, the host's tree of it, mended (`mend`)."""
    transfer = plan_transfer(tree, present(host), held)
    stream, sizes = transfer_stream(transfer, f"envs/{env}" if held is not None else f"envs/{env}.tmp-{mark}", cache)
    reader, total = stream.open()
    data = reader.read()
    assert len(data) == total
    if damage:
        data = damage(data)
    return transfer, run(host, "receive" if held is None else "mend", env, mark, *sizes, stdin=data)


def files_of(root: Path) -> dict[str, str]:
    """Every file below ROOT with its sha256, every symlink with its target."""
    found = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            found[name] = "-> " + os.readlink(path)
        elif path.is_file():
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def artifact_files(artifact: Path) -> dict[str, str]:
    found = {}
    with tarfile.open(artifact) as archive:
        for member in archive:
            if member.isfile():
                found[member.name] = hashlib.sha256(archive.extractfile(member).read()).hexdigest()
            elif member.issym():
                found[member.name] = "-> " + member.linkname
    return found


def test_an_artifact_unpacks_once_into_objects_and_a_tree_in_artifact_order(tmp_path):
    env, tree = built(tmp_path, "6.0.1")
    assert read_tree(tmp_path, env) == tree
    assert list(tree)[:3] == ["lib", "lib/python3.11", "lib/python3.11/site-packages"]
    assert tree["bin/yaml"] == Entry("l", 0o777, "tool")
    big = tree["lib/python3.11/site-packages/yaml/big.bin"]
    assert big == Entry("f", 0o644, hashlib.sha256(BIG).hexdigest() + "-644", len(BIG))
    assert tree["bin/tool"].ref.endswith("-755")
    for name, size in tree_objects(tree).items():
        data = (tmp_path / "objects" / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, name[:64])


def test_the_plan_sends_only_what_the_host_lacks_and_removes_only_what_differs():
    new = {"a": Entry("d", 0o755, ""), "a/x": Entry("f", 0o644, "x-644", 5), "a/y": Entry("f", 0o644, "y2-644", 7),
           "a/z": Entry("f", 0o644, "z-644", 9), "l": Entry("l", 0o777, "a/x")}
    held = {"a": Entry("d", 0o700, ""), "a/x": Entry("f", 0o644, "x-644", 5), "a/y": Entry("f", 0o644, "y1-644", 6),
            "gone": Entry("f", 0o644, "g-644", 1), "l": Entry("l", 0o777, "a/y")}
    transfer = plan_transfer(new, present={"x-644", "z-644"}, held=held)  # a tree mended
    assert transfer.remove == ("a/y", "gone", "l")  # not the directory whose mode changed: it is set again
    assert [path for path, _ in transfer.add] == ["a", "a/y", "a/z", "l"]
    assert transfer.send == (("y2-644", 7),)
    fresh = plan_transfer(new, present={"x-644", "z-644"})  # a new env: every entry, only the objects it lacks
    assert fresh.remove == () and [path for path, _ in fresh.add] == list(new)
    assert fresh.send == (("y2-644", 7),)
    assert plan_transfer(new, set()).send == (("x-644", 5), ("y2-644", 7), ("z-644", 9))


def test_the_host_program_makes_each_env_from_its_manifest_sends_each_object_once_and_collects_the_unused(
        tmp_path):
    cache, host = tmp_path / "cache", store(tmp_path)
    env_a, tree_a = built(cache, "6.0.1")
    env_b, tree_b = built(cache, "6.0.2", {f"{SITE}/yaml/new.py": b"n = 1\n"})

    first, result = receive(host, cache, env_a, tree_a)
    assert result.returncode == 0, result.stderr
    assert files_of(host / "envs" / env_a) == artifact_files(cache / f"{env_a}.tar.gz")
    assert sorted(os.listdir(host / "envs")) == [env_a] and os.listdir(host / "incoming") == []

    planted = host / "envs" / env_a / SITE.removeprefix(".local/") / "planted.pth"
    planted.write_text("import os\n")  # in the tree env_b shares most with: it does not travel into env_b
    second, result = receive(host, cache, env_b, tree_b)
    assert result.returncode == 0, result.stderr
    assert files_of(host / "envs" / env_b) == artifact_files(cache / f"{env_b}.tar.gz")
    sent = {name for name, _ in second.send}
    assert hashlib.sha256(BIG).hexdigest() + "-644" not in sent  # the big file went once, with the first env
    assert sent == set(tree_objects(tree_b)) - set(tree_objects(tree_a))
    big = "lib/python3.11/site-packages/yaml/big.bin"
    inodes = {(host / "envs" / env / big).stat().st_ino for env in (env_a, env_b)}
    assert inodes == {(host / "objects" / tree_b[big].ref).stat().st_ino}
    assert (host / "envs" / env_a / "lib/python3.11/site-packages/yaml/new.py").exists() is False
    assert present(host) == set(tree_objects(tree_a)) | set(tree_objects(tree_b))

    subprocess.run(["rm", "-rf", host / "envs" / env_a], check=True)
    assert run(host, "collect").returncode == 0
    assert present(host) == set(tree_objects(tree_b))
    assert files_of(host / "envs" / env_b) == artifact_files(cache / f"{env_b}.tar.gz")


@pytest.mark.parametrize("damage", ["cut", "flip"])
def test_a_cut_or_damaged_stream_leaves_no_env_no_object_and_no_leftover(tmp_path, damage):
    cache, host = tmp_path / "cache", store(tmp_path)
    env, tree = built(cache, "6.0.1")

    def spoil(data: bytes) -> bytes:
        where = data.index(BIG[:64])
        return data[:where + 1000] if damage == "cut" else data[:where] + bytes([data[where] ^ 1]) + data[where + 1:]

    _, result = receive(host, cache, env, tree, damage=spoil)
    assert result.returncode == 1
    said = result.stderr.decode()
    assert ("the objects did not arrive whole (tar: " if damage == "cut" else "an object arrived damaged (") in said
    assert os.listdir(host / "envs") == [] and os.listdir(host / "incoming") == [] and present(host) == set()

    _, result = receive(host, cache, env, tree)
    assert result.returncode == 0, result.stderr
    assert files_of(host / "envs" / env) == artifact_files(cache / f"{env}.tar.gz")


def test_repair_puts_a_good_copy_at_every_path_linked_to_a_damaged_object(tmp_path):
    cache, host = tmp_path / "cache", store(tmp_path)
    env_a, tree_a = built(cache, "6.0.1")
    env_b, tree_b = built(cache, "6.0.2")
    receive(host, cache, env_a, tree_a)
    receive(host, cache, env_b, tree_b)
    big = tree_a["lib/python3.11/site-packages/yaml/big.bin"].ref
    with (host / "objects" / big).open("r+b") as damaged:
        damaged.write(b"rot")

    stream = objects_tar(cache, ((big, len(BIG)),))
    result = run(host, "repair", "0badc0de", stdin=stream.open()[0].read())
    assert result.returncode == 0, result.stderr
    for env in (env_a, env_b):
        assert files_of(host / "envs" / env) == artifact_files(cache / f"{env}.tar.gz")
        path = host / "envs" / env / "lib/python3.11/site-packages/yaml/big.bin"
        assert path.stat().st_ino == (host / "objects" / big).stat().st_ino
    assert os.listdir(host / "incoming") == []


def test_an_env_a_run_before_ours_finished_meanwhile_is_kept_and_our_tree_dropped(tmp_path):
    cache, host = tmp_path / "cache", store(tmp_path)
    env, tree = built(cache, "6.0.1")
    (host / "envs" / env).mkdir()
    (host / "envs" / env / "theirs").write_text("")  # an orphaned chain of a killed run renamed its own tree
    _, result = receive(host, cache, env, tree)
    assert result.returncode == 0, result.stderr
    assert os.listdir(host / "envs") == [env] and os.listdir(host / "envs" / env) == ["theirs"]
    assert os.listdir(host / "incoming") == []


def probed(host: Path):
    """The env probe (files/host/ml_env_probe.sh, hashing as this user) run on HOST, as the control node reads it."""
    result = subprocess.run(["sh", "-c", program("ml_env_probe.sh", host, "no-such-image", "0:0")],
                            capture_output=True, text=True, check=True)
    return MlEnvFact().process(result.stdout.splitlines())


def test_the_probe_lists_each_tree_so_planted_changed_missing_and_odd_entries_show_and_mend_restores_it(tmp_path):
    cache, host = tmp_path / "cache", store(tmp_path)
    env, tree = built(cache, "6.0.1")
    receive(host, cache, env, tree)
    root, site = host / "envs" / env, SITE.removeprefix(".local/")
    (root / site / "evil.pth").write_text("import os; os.system('id')\n")
    (root / site / "sitecustomize.py").write_text("import os\n")
    (root / site / "yaml/__init__.py").unlink()
    (root / site / "yaml/__init__.py").write_text("__version__ = '6.0.1'\n# and more\n")  # a file no object is
    (root / site / "PyYAML-6.0.1.dist-info/top_level.txt").unlink()
    subprocess.run(["rm", "-rf", root / site / "yaml/__pycache__"], check=True)
    (root / site / "yaml/__pycache__").symlink_to(tmp_path)
    (root / site / "odd\nname.pth").write_text("")

    held = host_tree(tree, probed(host).trees[env])
    drift = tree_drift(tree, held)
    assert sorted(drift.extra) == sorted([f"{site}/evil.pth", f"{site}/sitecustomize.py", ODD])
    assert sorted(drift.missing) == [f"{site}/PyYAML-6.0.1.dist-info/top_level.txt",
                                     f"{site}/yaml/__pycache__/util.cpython-311.pyc"]  # below the link: unlisted
    assert sorted(drift.changed) == [f"{site}/yaml/__init__.py", f"{site}/yaml/__pycache__"]
    assert drift.summary().startswith("3 extra (")

    inode = root.stat().st_ino
    _, result = receive(host, cache, env, tree, held=held)
    assert result.returncode == 0, result.stderr
    assert files_of(root) == artifact_files(cache / f"{env}.tar.gz") and root.stat().st_ino == inode  # in place
    assert not any(tree_drift(tree, host_tree(tree, probed(host).trees[env])))
    assert os.listdir(tmp_path / "host" / "incoming") == []


def test_an_env_swapped_for_a_link_is_no_env_of_the_store_and_its_upload_replaces_the_link(tmp_path):
    cache, host = tmp_path / "cache", store(tmp_path)
    env_a, tree_a = built(cache, "6.0.1")
    env_b, tree_b = built(cache, "6.0.2")
    receive(host, cache, env_a, tree_a)
    elsewhere = tmp_path / "elsewhere"
    subprocess.run(["cp", "-a", host / "envs" / env_a, elsewhere], check=True)
    (elsewhere / "sitecustomize.py").write_text("import os\n")
    (host / "envs" / env_b).symlink_to(elsewhere)
    (host / "active").symlink_to(f"envs/{env_b}")

    state = probed(host)
    assert state.swapped == (env_b,) and set(state.envs) == {env_a} and set(state.trees) == {env_a}
    base = BaseImage("python:3.11-slim-bookworm", "sha256:img", "python3.11", "linux/amd64")
    assert plan_env(state, env_a, keep_envs=2, base=base, project="ours").remove == (f"envs/{env_b}",)
    plan = plan_env(state, env_b, keep_envs=2, base=base, project="ours")
    assert plan.upload and plan.activate and plan.remove == ()

    _, result = receive(host, cache, env_b, tree_b)
    assert result.returncode == 0, result.stderr
    assert not (host / "envs" / env_b).is_symlink()
    assert files_of(host / "envs" / env_b) == artifact_files(cache / f"{env_b}.tar.gz")
    assert (elsewhere / "sitecustomize.py").exists()  # what the link led to is not ours to remove
