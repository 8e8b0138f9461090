"""The control side of the compose project: its files, registry images, archives and layers (builds:
test_stack_build.py)."""

import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tasks.control.compose_project import ComposeProject, StackError, compose_config
from tasks.control.image_archives import SavedLayer, archive_layers, chain_ids, partial_archive
from tasks.control.registry import docker_config, registry_of, repository_of
from tasks.host.stack_images import layers_to_send


def test_a_project_file_whose_name_cannot_travel_one_per_line_is_refused(tmp_path):
    (tmp_path / "compose.yaml").write_text("services:\n  a: {image: x}\n")
    (tmp_path / "notes\nrm -rf").write_text("")
    project = ComposeProject.load(str(tmp_path))
    with pytest.raises(StackError, match=r"the file name 'notes\\nrm -rf' cannot be shipped"):
        project.files_to_ship()


@pytest.mark.parametrize(("reference", "registry"), [
    ("registry.corp:5000/team/api:1", "registry.corp:5000"), ("ghcr.io/org/x", "ghcr.io"),
    ("localhost/x:1", "localhost"), ("nginx:1.27", "docker.io"), ("library/nginx", "docker.io"),
])
def test_the_registry_of_a_reference_as_docker_reads_it(reference, registry):
    assert registry_of(reference) == registry


def test_a_docker_config_holds_the_logins_of_the_registries_asked_for(monkeypatch):
    monkeypatch.setenv("REG_PW", "s3cret:with-colon")
    credentials = {"registry.corp:5000": "ci:${REG_PW}", "other.corp": "x:${REG_PW}"}
    config = json.loads(docker_config(credentials, ["registry.corp:5000", "unknown.corp"]))
    assert config == {"auths": {"registry.corp:5000": {"auth": base64.b64encode(b"ci:s3cret:with-colon").decode()}}}


@pytest.mark.parametrize(("reference", "repository"), [
    ("registry.corp:5000/team/api:1", "registry.corp:5000/team/api"),
    ("registry.corp:5000/api", "registry.corp:5000/api"),
    ("nginx:1.27", "nginx"),
])
def test_the_repository_of_a_reference_keeps_the_registry_port(reference, repository):
    assert repository_of(reference) == repository


def test_without_compose_files_the_project_is_what_compose_reads_by_default(tmp_path):
    (tmp_path / "docker-compose.yml").write_text("services:\n  a: {image: x}\n")
    (tmp_path / "docker-compose.override.yml").write_text("services:\n  a: {environment: {LEVEL: debug}}\n")
    project = ComposeProject.load(str(tmp_path))
    assert project.files == ("docker-compose.yml", "docker-compose.override.yml")
    assert project.services["a"]["environment"] == {"LEVEL": "debug"}
    (tmp_path / "compose.override.yaml").write_text("services:\n  b: {image: y}\n")  # compose prefers it
    by_compose = subprocess.run(["docker", "compose", "config", "--services"], cwd=tmp_path, capture_output=True,
                                text=True, check=True).stdout.split()
    ComposeProject.load.cache_clear()
    assert sorted(ComposeProject.load(str(tmp_path)).services) == sorted(by_compose) == ["a", "b"]


def test_reading_the_project_starts_no_docker_cli_and_gives_what_docker_compose_gives(tmp_path, monkeypatch):
    """Each read runs compose's own binary, the one `docker info` names: the docker CLI in front of it costs a
    no-op two more Go programs. Both reads (as written, and interpolated) equal `docker compose config`'s."""
    (tmp_path / "compose.yaml").write_text("services:\n  a: {image: 'x:${TAG:-1}', environment: {KEY: $KEY}}\n")
    plugins = json.loads(subprocess.run(["docker", "info", "--format", "{{json .ClientInfo.Plugins}}"],
                                        capture_output=True, text=True, env={"PATH": os.environ["PATH"],
                                        "DOCKER_HOST": "unix:///nonexistent"}).stdout)
    compose = next(plugin["Path"] for plugin in plugins if plugin["Name"] == "compose")
    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    for name, real in (("docker", shutil.which("docker")), ("docker-compose", compose)):
        (wrappers / name).write_text(f'#!/bin/sh\necho "$0" >> {tmp_path}/started\nexec {real} "$@"\n')
        (wrappers / name).chmod(0o755)
    real_path = os.environ["PATH"]
    by_docker = [json.loads(subprocess.run(["docker", "compose", "-f", "compose.yaml", "config", "--format", "json",
                                            *extra], cwd=tmp_path, capture_output=True, text=True, check=True,
                                           env={"PATH": real_path, "TAG": "2", "KEY": "v"}).stdout)
                 for extra in (["--no-interpolate"], [])]
    monkeypatch.setenv("PATH", f"{wrappers}:{real_path}")
    assert compose_config(tmp_path, ("compose.yaml",)) == by_docker[0]
    assert compose_config(tmp_path, ("compose.yaml",), {"TAG": "2", "KEY": "v"}) == by_docker[1]
    assert not (tmp_path / "started").exists()  # neither the CLI nor a docker-compose of PATH (compose v1, say)

def saved_image(path: Path, layers: dict[str, bytes]) -> list[str]:
    """A `docker save | gzip` of one image whose layers are LAYERS (member name -> tar bytes) in order,
    shaped as docker 25+ writes it; returns the layers' diff ids."""
    diff_ids = ["sha256:" + hashlib.sha256(data).hexdigest() for data in layers.values()]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    members = {**layers, "blobs/sha256/config": config,
               "manifest.json": json.dumps([{"Config": "blobs/sha256/config", "RepoTags": ["app:2"],
                                             "Layers": list(layers)}]).encode()}
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return diff_ids


def test_chain_ids_follow_the_oci_rule():
    first, second = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    assert chain_ids([first, second]) == [first, "sha256:" + hashlib.sha256(f"{first} {second}".encode()).hexdigest()]


def test_a_host_holding_the_lower_layers_is_sent_the_archive_without_them(tmp_path):
    archive = tmp_path / "app-2.tar.gz"
    diff_ids = saved_image(archive, {"blobs/sha256/base": b"b" * 4096, "blobs/sha256/app": b"a" * 512})
    chains = chain_ids(diff_ids)
    assert archive_layers(archive) == [SavedLayer("blobs/sha256/base", chains[0], ("blobs/sha256/base",)),
                                       SavedLayer("blobs/sha256/app", chains[1], ("blobs/sha256/app",))]
    partial = partial_archive(archive, ("blobs/sha256/base",))
    with tarfile.open(partial) as sent:
        assert sent.getnames() == ["blobs/sha256/app", "blobs/sha256/config", "manifest.json"]
        layers = json.loads(sent.extractfile("manifest.json").read())[0]["Layers"]
        assert layers == ["blobs/sha256/base", "blobs/sha256/app"]  # the manifest still names every layer
    assert partial_archive(archive, ("blobs/sha256/base",)) == partial  # made once, kept beside the archive
    (tmp_path / "broken.tar.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(StackError, match="not the `docker save` of one image"):
        archive_layers(tmp_path / "broken.tar.gz")


def saved_with_repeats(path: Path, layout: str, layers: list[bytes]) -> list[str]:
    """A `docker save | gzip` of one image whose layers are LAYERS in order, some repeated, as LAYOUT's docker
    writes it: docker 20.10 gives each position a directory and a repeated layer a link to its first copy;
    docker 25 stores each blob once and names it at each position. Returns the members the manifest names."""
    diff_ids = ["sha256:" + hashlib.sha256(data).hexdigest() for data in layers]
    members: dict[str, bytes | str] = {}  # a str: a symbolic link's target
    names, first = [], {}
    for position, (data, diff_id) in enumerate(zip(layers, diff_ids, strict=True)):
        if layout == "docker 25":
            name = f"blobs/sha256/{diff_id[7:]}"
            members[name] = data
        else:
            directory = hashlib.sha256(f"{position} {diff_id}".encode()).hexdigest()  # the position's v1 id
            name = f"{directory}/layer.tar"
            members[f"{directory}/json"] = b"{}"
            members[name] = f"../{first[diff_id]}" if diff_id in first else data
        first.setdefault(diff_id, name)
        names.append(name)
    members["config.json"] = json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    members["manifest.json"] = json.dumps([{"Config": "config.json", "RepoTags": ["app:2"], "Layers": names}]).encode()
    with tarfile.open(path, "w:gz") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                archive.addfile(info)
            else:
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
    return names


@pytest.mark.parametrize("layout", ["docker 20.10", "docker 25"])
def test_a_repeated_layer_stays_in_the_sent_archive_while_a_layer_the_host_lacks_reads_it(tmp_path, layout):
    """The empty layer at positions 2 and 4: a host holding the first two layers lacks the last two, which
    `docker load` reads (by the repeated blob's name, or through the link to its first copy)."""
    archive = tmp_path / "app-2.tar.gz"
    data = [b"b" * 4096, b"\0" * 1024, b"a" * 512, b"\0" * 1024]
    names = saved_with_repeats(archive, layout, data)
    held = frozenset(chain_ids(["sha256:" + hashlib.sha256(layer).hexdigest() for layer in data])[:2])
    leave_out, total = layers_to_send(archive, held)
    assert (total, leave_out) == (4, (names[0],))  # the base layer alone stays behind
    with tarfile.open(partial_archive(archive, leave_out)) as sent:
        assert names[0] not in sent.getnames()
        for position in (2, 3):  # tarfile follows a link as `docker load` does: its target must be there
            assert sent.extractfile(names[position]).read() == data[position]
