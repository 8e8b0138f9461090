"""Secrets audit on a real 2-host fleet: an HF token, an index password and a stack secret go through a
first deploy (env build, model download, stack start), a dry run with a rotated secret and a verify,
all at -vvv; none of them shows in any output, in any process's argv on the machine while they run
(control node and hosts), in container labels, in control-node caches, or in any host file but the
stack's .env (0600) and docker's own root-only record of the container's environment."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from pathlib import Path

import pytest
from fleet_helpers import ArgvWatch

from rehearsal.fleet import STATE_ROOT

COMPOSE = "/srv/mlstack/compose"
SECRETS = {
    "HF_TOKEN": "hf_FAKEt0kenNotReal0123456789",
    "MLSTACK_INDEX_PASSWORD": "idx-pw-9f8e7d6c",
    "MLSTACK_API_KEY": "api-key-5c4b3a21",
}
ROTATED = "api-key-rotated-77e1"


def files_holding(root: Path, needle: str) -> set[str]:
    found = set()
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and needle.encode() in path.read_bytes():
                found.add(str(path.relative_to(root)))
        except OSError:
            continue
    return found


@pytest.fixture
def wiped(fleet):
    fleet.wipe()
    yield
    fleet.wipe()


@pytest.mark.heavy
def test_no_secret_reaches_output_argv_labels_caches_or_host_files(fleet, wiped, tmp_path):
    caches = {key: tmp_path / key for key in ("ml_env_cache_dir", "hf_control_cache_dir", "image_cache_dir")}
    index = fleet.fleet.index_url.replace("http://", "http://mlstack:${MLSTACK_INDEX_PASSWORD}@")
    data = [f"{key}={path}" for key, path in caches.items()] + [
        f"pip_index_url={index}", 'stack_secrets=["MLSTACK_API_KEY"]']
    args = [arg for item in data for arg in ("--data", item)]
    rotated = {**SECRETS, "MLSTACK_API_KEY": ROTATED}

    with ArgvWatch([*SECRETS.values(), ROTATED]) as watch:
        first = fleet.deploy("-vvv", "--diff", *args, env=SECRETS)
        dry = fleet.deploy("--dry", "-vvv", "--diff", *args, env=rotated)
        verify = fleet.tool("tasks.fleet.verify", "-vvv", *args, env=SECRETS)
    assert first.returncode == 0, first.output[-3000:]
    # the build and the download ran
    assert "building" in first.output and "model file model.safetensors" in first.output
    assert dry.returncode == 0 and "MLSTACK_API_KEY" in dry.output  # the rotation shows, by name only
    assert verify.returncode == 0, verify.stdout + verify.stderr[-3000:]

    outputs = first.output + str(first.payload) + dry.output + str(dry.payload) + verify.stdout + verify.stderr
    for value in [*SECRETS.values(), ROTATED]:
        assert value not in outputs
    assert watch.hits == []
    # The watch did see the run: pyinfra on the control node, compose on the hosts.
    assert any(b"mlstack.deploy.converge" in argv for argv in watch.seen)
    assert any(b"compose" in argv for argv in watch.seen)

    for path in caches.values():
        for value in SECRETS.values():
            assert files_holding(path, value) == set()
    for record in fleet.hosts:
        docs = fleet.ssh(record, "docker inspect -f '{{json .Config.Env}}' mlstack-reranker-docs-1")
        assert "API_KEY" not in docs  # a secret reaches only the services whose definitions read it
        labels = fleet.ssh(record, "docker ps -aq | xargs docker inspect -f '{{json .Config.Labels}}'")
        assert "mlstack.env-id" in labels and not any(value in labels for value in SECRETS.values())
        root = STATE_ROOT / fleet.fleet.name / "hosts" / record.name  # the host's /srv, /var/lib/docker, /etc, /tmp...
        held = files_holding(root, SECRETS["MLSTACK_API_KEY"])
        env_file = f"srv{COMPOSE.removeprefix('/srv')}/.env"
        # docker keeps every container's environment in its own root-only state (`docker inspect` shows it):
        # the container config and containerd's metadata store; and while a healthcheck's exec starts, the
        # process spec containerd hands runc is a file in /tmp (0600, removed once the exec runs).
        docker_records = {path for path in held
                          if path.startswith("docker/containers/") and path.endswith("/config.v2.json")}
        docker_records |= {path for path in held if path.endswith("io.containerd.metadata.v1.bolt/meta.db")}
        exec_specs = {path for path in held if re.fullmatch(r"tmp/runc-process\d+", path)}
        # the release a rollback puts back keeps its own copy of .env, in root's 0700 releases directory
        release_envs = {path for path in held if re.fullmatch(r"srv/mlstack/releases/rel-[0-9a-f]{16}/project/\.env",
                                                                path)}
        assert held - exec_specs == {env_file, *docker_records, *release_envs} and docker_records, held
        assert len(release_envs) == 1 and (root / "srv/mlstack/releases").stat().st_mode & 0o777 == 0o700
        assert all((root / path).stat().st_mode & 0o777 == 0o600 for path in release_envs)
        for path in exec_specs:
            with contextlib.suppress(FileNotFoundError):  # gone already, as it should be
                spec = (root / path).stat()
                assert spec.st_uid == 0 and spec.st_mode & 0o077 == 0, path
        assert (root / env_file).stat().st_mode & 0o777 == 0o600
        assert (root / "docker").stat().st_mode & 0o007 == 0  # /var/lib/docker: no way in for other users
        assert all((root / path).stat().st_uid == 0 for path in docker_records)
        # What tells a later run that the secret changed is a salted scrypt fingerprint, and no file or
        # label holds a plain hash of it to test guesses against.
        digest = fleet.ssh(record, f"cat {COMPOSE}/.env.digest").splitlines()
        salt = bytes.fromhex(digest[0].removeprefix("# salt "))
        fingerprint = hashlib.scrypt(SECRETS["MLSTACK_API_KEY"].encode(), salt=salt, n=2**14, r=8, p=1, dklen=16)
        assert f"MLSTACK_API_KEY={fingerprint.hex()}" in digest
        for plain in (hashlib.sha256(form.encode()).hexdigest()[:16]
                      for form in (SECRETS["MLSTACK_API_KEY"], json.dumps(SECRETS["MLSTACK_API_KEY"]))):
            assert plain not in labels and files_holding(root, plain) == set()
        assert files_holding(root, SECRETS["HF_TOKEN"]) == set()
        assert files_holding(root, SECRETS["MLSTACK_INDEX_PASSWORD"]) == set()
