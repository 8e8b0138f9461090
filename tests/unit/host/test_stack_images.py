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


def run_load(tmp_path: Path, data: bytes | None, sha256: str, *mode: str,
             incoming: Path | None = None) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    docker = bin_dir / "docker"
    docker.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/docker-args\ncp "$4" {tmp_path}/loaded\n')
    docker.chmod(0o755)
    incoming = incoming or tmp_path / ".image.tar.gz"
    if data is not None:
        incoming.write_bytes(data)
    command = program("load_image.sh", *mode, str(incoming), sha256, "registry.corp/api:1")
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
    upload = commands[-1].upload
    assert upload.receive.endswith(" && " + program("load_image.sh", f"/srv/compose/.image-{RUN_MARK}.tar.gz",
                                                     hashlib.sha256(b"archive").hexdigest(), "api:1"))


def test_a_fan_out_seed_loads_its_archive_and_keeps_it_to_serve(tmp_path):
    data = b"a docker save archive"
    result = run_load(tmp_path, data, hashlib.sha256(data).hexdigest(), "--seed")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "loaded").read_bytes() == data and (tmp_path / ".image.tar.gz").read_bytes() == data


def test_what_a_swarm_fetched_is_checked_loaded_and_its_folder_removed_whatever_arrived(tmp_path):
    data, work = b"a docker save archive", tmp_path / ".image-0badc0de.swarm"
    (work / "objects").mkdir(parents=True)
    arrived = work / "objects" / "api-1.tar.gz"
    result = run_load(tmp_path, data, hashlib.sha256(data).hexdigest(), "--swarm", str(work), incoming=arrived)
    assert (result.returncode, result.stdout) == (0, "image registry.corp/api:1 loaded from the swarm\n"), result.stderr
    assert (tmp_path / "loaded").read_bytes() == data and not work.exists()

    (work / "objects").mkdir(parents=True)
    (tmp_path / "loaded").unlink()
    result = run_load(tmp_path, None, hashlib.sha256(data).hexdigest(), "--swarm", str(work), incoming=arrived)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", "")  # nothing arrived: sent directly
    assert not work.exists() and not (tmp_path / "loaded").exists()

    (work / "objects").mkdir(parents=True)
    result = run_load(tmp_path, b"what a bad peer sent", hashlib.sha256(data).hexdigest(), "--swarm", str(work),
                      incoming=arrived)
    assert result.returncode == 1 and "does not match its sha256" in result.stderr
    assert not work.exists() and not (tmp_path / "loaded").exists()
