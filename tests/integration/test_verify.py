"""`python -m tasks.fleet.verify`: a read-only check of the fleet — it finds drift and changes nothing."""

from __future__ import annotations

import subprocess

ENV = "/srv/mlstack/ml-env"
SNAPSHOT_STATE = ("find /srv/mlstack -printf '%p %m %u %g %s %T@\\n' | sort | md5sum; "
                  "docker ps -q --no-trunc | sort | md5sum")


def verify(fleet, *args: str) -> subprocess.CompletedProcess:
    return fleet.tool("tasks.fleet.verify", *args)


def host_row(result, name: str) -> str:
    return next(line for line in result.stdout.splitlines() if line.startswith(name + " "))


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
