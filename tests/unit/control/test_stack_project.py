"""The control side of the compose project: build contexts as docker sends them (`.dockerignore`)."""

import base64
import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from tasks.control.compose_project import Build, ComposeProject, StackError
from tasks.control.image_archives import archive_layers, chain_ids, partial_archive
from tasks.control.registry import docker_config, registry_of, repository_of
from tasks.control.stack_project import context_files, ignore_rules, ignored

RULES = "compose.yaml\n**/__pycache__\n*.md\n!README.md\nsecrets/\n/build\ndocs/**/*.txt\n# a comment\n\n"


@pytest.mark.parametrize(("relative", "left_out"), [
    ("compose.yaml", True), ("sub/compose.yaml", False),  # a name without a slash is the context's root only
    ("a/__pycache__/x.pyc", True), ("__pycache__/y", True),  # ** spans any directories, none included
    ("notes.md", True), ("README.md", False), ("sub/notes.md", False),  # ! re-includes; the last rule decides
    ("secrets/key", True), ("build/out", True), ("src/build/x", False),  # a directory takes its content along
    ("docs/a/b/c.txt", True), ("docs/c.txt", True), ("app.py", False),
])
def test_dockerignore_rules_as_docker_reads_them(tmp_path, relative, left_out):
    (tmp_path / ".dockerignore").write_text(RULES)
    assert ignored(relative, ignore_rules(tmp_path)) is left_out


def test_the_context_leaves_out_what_dockerignore_names_but_never_the_dockerfile(tmp_path):
    for name, text in {"Dockerfile": "FROM x\n", ".dockerignore": "Dockerfile\n*.yaml\n", "compose.yaml": "",
                       "app.py": "print()\n"}.items():
        (tmp_path / name).write_text(text)
    files = context_files(Build("api", tmp_path, "Dockerfile", {}, None, None))
    assert sorted(files) == [".dockerignore", "Dockerfile", "app.py"]


def test_the_reranker_image_does_not_depend_on_its_compose_file():
    reranker = Path(__file__).parents[3] / "files/stacks/reranker"
    assert "compose.yaml" not in context_files(Build("reranker", reranker, "Dockerfile.server", {}, None, None))


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
    assert archive_layers(archive) == [("blobs/sha256/base", chains[0]), ("blobs/sha256/app", chains[1])]
    partial = partial_archive(archive, ("blobs/sha256/base",))
    with tarfile.open(partial) as sent:
        assert sent.getnames() == ["blobs/sha256/app", "blobs/sha256/config", "manifest.json"]
        layers = json.loads(sent.extractfile("manifest.json").read())[0]["Layers"]
        assert layers == ["blobs/sha256/base", "blobs/sha256/app"]  # the manifest still names every layer
    assert partial_archive(archive, ("blobs/sha256/base",)) == partial  # made once, kept beside the archive
    (tmp_path / "broken.tar.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(StackError, match="not the `docker save` of one image"):
        archive_layers(tmp_path / "broken.tar.gz")
