"""`python -m tasks.fleet.verify`: a read-only check of the fleet — it finds drift and changes nothing."""

from __future__ import annotations

import subprocess

import pytest
from fleet_helpers import active, new_requirements

ENV = "/srv/mlstack/ml-env"
SNAPSHOT_STATE = ("find /srv/mlstack -printf '%p %m %u %g %s %T@\\n' | sort | md5sum; "
                  "docker ps -q --no-trunc | sort | md5sum")


def verify(fleet, *args: str) -> subprocess.CompletedProcess:
    return fleet.tool("tasks.fleet.verify", *args)


def host_row(result, name: str) -> str:
    return next(line for line in result.stdout.splitlines() if line.startswith(name + " "))


@pytest.mark.heavy  # 88 s: make test's 15 minutes
def test_verify_passes_a_converged_fleet_and_finds_each_kind_of_drift_without_repairing_it(fleet):
    fleet.wipe()
    assert fleet.deploy().returncode == 0
    clean = verify(fleet, "--hashes")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "verify: 2/2 host(s) match" in clean.stdout
    assert all(host_row(clean, record.name).split()[1] == "ok" for record in fleet.hosts)

    first, second = fleet.hosts
    blob = "/srv/mlstack/hf-cache/hub/models--sentence-transformers--all-MiniLM-L6-v2/blobs"
    fleet.ssh(first, f"f=$(ls -S {blob} | head -1);"
                     f" dd if=/dev/zero of={blob}/$f bs=1k count=1 conv=notrunc status=none")
    # an object of the env store rots in place (same size, its mtime put back): every env linking it sees it
    record = fleet.ssh(first, f"find {ENV}/active/ -name RECORD -ipath '*pyyaml*'").strip()
    damaged = fleet.ssh(first, f"find {ENV}/objects -samefile {record} -printf %f").strip()
    fleet.ssh(first, f"touch -r {record} /tmp/stamp && printf rot | dd of={record} conv=notrunc status=none "
                     f"&& touch -r /tmp/stamp {record}")
    site = fleet.ssh(second, "echo /srv/mlstack/ml-env/active/lib/python3*/site-packages").strip()
    fleet.ssh(second, f"chmod 0700 /srv/mlstack/ml-env && mv {site}/yaml /srv/yaml.saved")
    try:
        before = {record.name: fleet.ssh(record, SNAPSHOT_STATE) for record in fleet.hosts}
        sizes_only = verify(fleet)
        hashed = verify(fleet, "--hashes")
        after = {record.name: fleet.ssh(record, SNAPSHOT_STATE) for record in fleet.hosts}
    finally:
        fleet.ssh(second, f"mv /srv/yaml.saved {site}/yaml && chmod 0755 /srv/mlstack/ml-env")
    assert after == before  # nothing written, nothing restarted
    assert sizes_only.returncode == hashed.returncode == 1
    assert "models" not in host_row(sizes_only, first.name)  # same size: only a hash tells
    assert "DRIFT" in host_row(hashed, first.name) and "models" in host_row(hashed, first.name)
    assert "ML env" not in host_row(sizes_only, first.name) and "ML env" in host_row(hashed, first.name)
    second_row = host_row(hashed, second.name)
    assert "DRIFT" in second_row and "directories" in second_row and "ML env" in second_row
    assert "fails its import check" in second_row and "No module named 'yaml'" in second_row
    repaired = fleet.deploy("--data", "model_verify_hashes=true", "--data", "ml_env_verify_hashes=true")
    assert repaired.returncode == 0, repaired.output[-3000:]
    assert f"[{first.name}] ML env store: 1 damaged object(s) ({damaged[:12]}…)" in repaired.output
    # a good copy, linked at the env's path (and the store's): what its name says
    assert fleet.ssh(first, f"sha256sum < {record}").split()[0] == damaged[:64]
    assert fleet.ssh(first, f"stat -c %i {record} {ENV}/objects/{damaged} | uniq | wc -l").strip() == "1"
    assert verify(fleet, "--hashes").returncode == 0


PLANTED = ("mlstack-planted.pth", "sitecustomize.py")


def site_of(fleet, record, env: str) -> str:
    return fleet.ssh(record, f"echo {ENV}/envs/{env}/lib/python3*/site-packages").strip()


def plant(fleet, record, site: str) -> None:
    fleet.ssh(record, " && ".join(f"echo 'import os' > {site}/{name}" for name in PLANTED))


@pytest.mark.heavy
def test_planted_files_and_a_swapped_env_show_in_verify_the_deploy_mends_them_and_a_new_env_carries_none(
        fleet, tmp_path):
    assert fleet.deploy().returncode == 0
    first, second = fleet.hosts
    env = active(fleet, first)
    assert active(fleet, second) == env
    site = site_of(fleet, first, env)
    plant(fleet, first, site)
    # the second host's env swapped for a link to a copy of it with a sitecustomize.py of its own (the tree
    # itself moved aside: the running services keep what they mounted until the new env recreates them)
    fleet.ssh(second, f"rm -rf /srv/swapped-env /srv/original-env && cp -a {ENV}/envs/{env} /srv/swapped-env && "
                      f"echo 'import os' > /srv/swapped-env/{site.split(f'/{env}/', 1)[1]}/sitecustomize.py && "
                      f"mv {ENV}/envs/{env} /srv/original-env && ln -s /srv/swapped-env {ENV}/envs/{env}")
    try:
        plain, hashed = verify(fleet), verify(fleet, "--hashes")
        assert plain.returncode == hashed.returncode == 1
        assert host_row(plain, first.name).split()[1] == "ok"  # a planted file shows only when the trees are listed
        swapped = f"ML env store: envs/{env} is a link, not a tree of the store: it is replaced"
        assert swapped in plain.stdout and swapped in hashed.stdout
        assert "DRIFT" in host_row(hashed, first.name) and "ML env" in host_row(hashed, first.name)
        relative = site.split(f"/{env}/", 1)[1]
        assert (f"ML env store: envs/{env} differs from its manifest: 2 extra ({relative}/{PLANTED[0]}, "
                f"{relative}/{PLANTED[1]}): mended from the manifest") in hashed.stdout \
            or (f"2 extra ({relative}/{PLANTED[1]}, {relative}/{PLANTED[0]}): mended from the manifest"
                in hashed.stdout), hashed.stdout

        mended = fleet.deploy("--data", "ml_env_verify_hashes=true")
        assert mended.returncode == 0, mended.output[-3000:]
        assert fleet.ssh(first, f"ls {site}/{PLANTED[0]} {site}/{PLANTED[1]} 2>/dev/null || true").strip() == ""
        assert fleet.ssh(second, f"test -d {ENV}/envs/{env} && test ! -L {ENV}/envs/{env} && "
                                 f"test ! -e {site}/sitecustomize.py && echo tree").strip() == "tree"
        assert verify(fleet, "--hashes").returncode == 0

        plant(fleet, first, site)  # planted in the env a new one shares nearly all its files with
        installed = fleet.deploy("--data", new_requirements(tmp_path))
        assert installed.returncode == 0, installed.output[-3000:]
        new = active(fleet, first)
        assert new != env
        new_site = site_of(fleet, first, new)
        assert fleet.ssh(first, f"ls {new_site}/{PLANTED[0]} {new_site}/{PLANTED[1]} 2>/dev/null || true").strip() == ""
    finally:
        fleet.ssh(second, "rm -rf /srv/swapped-env /srv/original-env")
