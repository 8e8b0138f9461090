"""Image shipping's host program (files/host/load_image.sh, run after the archive is received): the archive is
checked against its sha256, then `docker load`ed (a fake docker here) and removed; a copy that does not match is
removed, never loaded."""

import hashlib
import os
import subprocess
from pathlib import Path

from tasks.host.programs import program
from tasks.host.stack_images import ship_image
from tasks.host.transfer import RUN_MARK


def run_load(tmp_path: Path, data: bytes, sha256: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    docker = bin_dir / "docker"
    docker.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/docker-args\ncp "$4" {tmp_path}/loaded\n')
    docker.chmod(0o755)
    incoming = tmp_path / ".image.tar.gz"
    incoming.write_bytes(data)
    command = program("load_image.sh", str(incoming), sha256, "registry.corp/api:1")
    return subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})


def test_an_archive_matching_its_sha256_is_loaded_then_removed(tmp_path):
    data = b"a docker save archive"
    result = run_load(tmp_path, data, hashlib.sha256(data).hexdigest())
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "docker-args").read_text() == f"load -q -i {tmp_path}/.image.tar.gz\n"
    assert (tmp_path / "loaded").read_bytes() == data
    assert not (tmp_path / ".image.tar.gz").exists()


def test_an_archive_whose_sha256_differs_is_removed_and_never_loaded(tmp_path):
    result = run_load(tmp_path, b"a corrupted copy", hashlib.sha256(b"the archive").hexdigest())
    assert result.returncode == 1
    assert result.stderr.strip().endswith("image registry.corp/api:1: the archive does not match its sha256; "
                                          "it was removed, run the deploy again")
    assert not (tmp_path / "docker-args").exists() and not (tmp_path / ".image.tar.gz").exists()


def test_ship_image_runs_the_program_after_receiving(tmp_path):
    archive = tmp_path / "api-1.tar.gz"
    archive.write_bytes(b"archive")
    commands = list(ship_image._inner(reference="api:1", make_archive=lambda: archive, archive=archive,
                                      compose_dir="/srv/compose"))
    upload = commands[-1]
    assert upload.receive.endswith(" && " + program("load_image.sh", f"/srv/compose/.image-{RUN_MARK}.tar.gz",
                                                     hashlib.sha256(b"archive").hexdigest(), "api:1"))
