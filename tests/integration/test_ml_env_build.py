"""The ML env build on a real engine of the fleet, from the fleet's real package index."""

from __future__ import annotations

import subprocess
from pathlib import Path

import docker
import pytest

from rehearsal.baseimage import IMAGE_NAME
from tasks.control.env_artifact import ArtifactError, env_id
from tasks.control.env_build import build_env

REQUIREMENTS = (Path(__file__).parents[2] / "files/requirements.rehearsal.txt").read_text()


@pytest.fixture
def builder(fleet):
    record = fleet.hosts[0]
    client = docker.DockerClient(base_url=f"unix://{fleet.fleet.host_dir(record.name) / 'docker.sock'}", timeout=600)
    yield record, client
    client.close()


def pip_options(fleet):
    return {"index_url": fleet.fleet.index_url, "trusted_hosts": [fleet.fleet.gateway]}


def test_the_env_is_built_once_and_imports_in_the_runtime_image(fleet, builder, tmp_path):
    record, client = builder
    base_id = client.images.get(IMAGE_NAME).id
    env = env_id(REQUIREMENTS, base_id, "linux/amd64", pip_options(fleet))
    manifest = build_env(client, env, IMAGE_NAME, REQUIREMENTS, pip_options(fleet), tmp_path)
    assert manifest.imports == {"huggingface-hub": ["huggingface_hub"], "nvidia-cuda-runtime": ["nvidia"],
                                "pyyaml": ["yaml"], "tokenizers": ["tokenizers"]}
    assert (manifest.cuda_runtime, manifest.torch) == ("13.0.96", {})  # the runtime wheel's dist-info; no torch
    artifact = tmp_path / f"{env}.tar.gz"
    stat_before = artifact.stat()
    builds = {"label": "mlstack.env-build"}  # the bootstrap containers (a host may run the stack besides)
    containers_before = len(client.containers.list(all=True, filters=builds))

    again = build_env(client, env, IMAGE_NAME, REQUIREMENTS, pip_options(fleet), tmp_path)
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
        build_env(client, "env-broken", IMAGE_NAME, requirements, pip_options(fleet), tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert client.containers.list(all=True, filters={"label": "mlstack.env-build"}) == []
