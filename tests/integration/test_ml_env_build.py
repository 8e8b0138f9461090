"""The ML env build on a real engine of the fleet, from the fleet's real package index."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import docker
import pytest

from rehearsal.baseimage import IMAGE_NAME
from tasks.control.builder import BaseImage
from tasks.control.env_artifact import ArtifactError, recipe_id
from tasks.control.env_build import BUILD_NETWORK, build_env

REQUIREMENTS = (Path(__file__).parents[2] / "files/requirements.rehearsal.txt").read_text()


@pytest.fixture
def builder(fleet):
    record = fleet.hosts[0]
    client = docker.DockerClient(base_url=f"unix://{fleet.fleet.host_dir(record.name) / 'docker.sock'}", timeout=600)
    yield record, client
    client.close()


def pip_options(fleet):
    return {"index_url": fleet.fleet.index_url, "trusted_hosts": [fleet.fleet.gateway]}


def base_of(client) -> BaseImage:
    return BaseImage(IMAGE_NAME, client.images.get(IMAGE_NAME).id, "python3.11", "linux/amd64")


def test_the_env_is_built_once_and_imports_in_the_runtime_image(fleet, builder, tmp_path):
    record, client = builder
    base = base_of(client)
    recipe = recipe_id(REQUIREMENTS, base.id, base.platform, pip_options(fleet))
    manifest = build_env(client, recipe, base, REQUIREMENTS, pip_options(fleet), tmp_path)
    env = manifest.env_id
    assert manifest.imports == {"huggingface-hub": ["huggingface_hub"], "nvidia-cuda-runtime": ["nvidia"],
                                "pyyaml": ["yaml"], "tokenizers": ["tokenizers"]}
    assert (manifest.cuda_runtime, manifest.torch) == ("13.0.96", {})  # the runtime wheel's dist-info; no torch
    artifact = tmp_path / f"{env}.tar.gz"
    stat_before = artifact.stat()
    builds = {"label": "mlstack.env-build"}  # the bootstrap containers (a host may run the stack besides)
    containers_before = len(client.containers.list(all=True, filters=builds))

    again = build_env(client, recipe, base, REQUIREMENTS, pip_options(fleet), tmp_path)
    assert again == manifest
    assert artifact.stat().st_mtime_ns == stat_before.st_mtime_ns and artifact.stat().st_ino == stat_before.st_ino
    assert len(client.containers.list(all=True, filters=builds)) == containers_before == 0  # no build container left

    # Unpacked on a host and mounted read-only where the stack mounts it, the env imports offline.
    target = f"/srv/ml-env-build-test/{env}"
    with artifact.open("rb") as data:
        subprocess.run([*fleet.fleet.ssh_argv(record), f"mkdir -p {target} && tar -xzf - -C {target}"],
                       stdin=data, check=True)
    imports = ", ".join(name for names in manifest.imports.values() for name in names)
    output = fleet.ssh(record, f"docker run --rm --network none -v {target}:/root/.local:ro "
                               "-e PYTHONPATH=/root/.local/lib/python3.11/site-packages "
                               f"{IMAGE_NAME} python3 -c 'import {imports}; print(huggingface_hub.__file__)'")
    assert output.strip() == "/root/.local/lib/python3.11/site-packages/huggingface_hub/__init__.py"
    fleet.ssh(record, "rm -rf /srv/ml-env-build-test")


def test_a_failed_install_reports_pips_error_and_caches_nothing(fleet, builder, tmp_path):
    record, client = builder
    requirements = "no-such-package-anywhere==1.0\n"
    with pytest.raises(ArtifactError, match=r"pip install failed \(exit 1\):(.|\n)*no-such-package-anywhere"):
        build_env(client, "recipe-broken", base_of(client), requirements, pip_options(fleet), tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert client.containers.list(all=True, filters={"label": "mlstack.env-build"}) == []


BUILD_IN_A_CHILD = """
import json
import sys
from pathlib import Path
import docker
from tasks.control.builder import BaseImage
from tasks.control.env_build import build_env
client = docker.DockerClient(base_url=sys.argv[1], timeout=600)
base = BaseImage(sys.argv[2], client.images.get(sys.argv[2]).id, "python3.11", "linux/amd64")
build_env(client, "recipe-killed", base, sys.argv[3], json.loads(sys.argv[4]), Path(sys.argv[5]))
"""


@pytest.mark.heavy  # a fault scenario: make test's 15 minutes
def test_a_deploy_killed_mid_build_stops_the_build_and_leaves_no_credential_on_the_builder(fleet, builder, tmp_path):
    record, client = builder
    password = "idx-pw-7f3a9c"  # pypiserver here takes any login: the URL carries it as a private index's would
    options = {**pip_options(fleet), "index_url": fleet.fleet.index_url.replace("http://", "http://ci:${IDX_PW}@")}
    socket = f"unix://{fleet.fleet.host_dir(record.name) / 'docker.sock'}"
    builds = {"label": "mlstack.env-build"}
    with fleet.throttled(record, "2mbit"):  # pip's downloads last long enough to kill the deploy during them
        child = subprocess.Popen(
            [sys.executable, "-c", BUILD_IN_A_CHILD, socket, IMAGE_NAME, REQUIREMENTS, json.dumps(options),
             str(tmp_path)],
            cwd=Path(__file__).parents[2], env={**os.environ, "IDX_PW": password},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            said = []
            for line in child.stderr:
                said.append(line)
                if "Collecting" in line or "Downloading" in line:  # pip is at work, with the config
                    break
            else:
                raise AssertionError("the build ended before pip began:\n" + "".join(said[-30:]))
            (container,) = client.containers.list(filters=builds)
        finally:
            child.kill()
            child.wait()
        deadline = time.monotonic() + 30
        container.reload()
        while container.status == "running":
            assert time.monotonic() < deadline, "the build went on after its deploy was killed"
            time.sleep(0.2)
            container.reload()
    assert container.attrs["State"]["ExitCode"] != 0
    assert container.attrs["HostConfig"]["NetworkMode"] == BUILD_NETWORK  # not the builder's own network
    assert password not in json.dumps(container.attrs)  # nor in its config or environment
    filesystem = b"".join(container.export())
    assert password.encode() not in filesystem and b"etc/pip.conf" not in filesystem
    assert list(tmp_path.iterdir()) == []

    # The next build removes the stopped leftover, and leaves nothing behind itself.
    base = base_of(client)
    recipe = recipe_id(REQUIREMENTS, base.id, base.platform, pip_options(fleet))
    build_env(client, recipe, base, REQUIREMENTS, pip_options(fleet), tmp_path / "next")
    assert client.containers.list(all=True, filters=builds) == []
