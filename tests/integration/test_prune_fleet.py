"""`mlstack prune` on a fleet: three releases deployed, then `--keep 2`: a dry run changes nothing and lists what
only the oldest release used; the run removes exactly that (its release, env, model snapshot and image, on every
host, and its env artifact, image archive and snapshot in the control caches) and a rollback to the other kept
release still needs no transfer."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from fleet_helpers import ENV_DIR, active, mlstack, new_requirements, project_copy, sent_to

from rehearsal import hub
from rehearsal.baseimage import CACHE_DIR

pytestmark = pytest.mark.heavy  # long scenarios: make test-heavy

REPO = Path(__file__).parents[2]
RERANKER = REPO / "files/stacks/reranker"
PROJECT = "mlstack-reranker"
RELEASES = "/srv/mlstack/releases"
NESTED_FOLDER = "/srv/mlstack/hf-cache/hub/models--mlstack-test--nested-tiny"


def private_caches(tmp_path: Path) -> tuple[dict[str, Path], list[str]]:
    """Copies of the rehearsal's control caches (the env and the models are there already; nothing is built
    again) and the --data that points the deploy at them: prune trims them, and the shared ones stay as they are
    for other sessions."""
    caches = {"ml_env": tmp_path / "ml-env", "hf": tmp_path / "hf", "images": tmp_path / "images"}
    for name in ("ml_env", "hf"):
        source = CACHE_DIR / caches[name].name
        if source.is_dir():
            subprocess.run(["cp", "-a", str(source), str(caches[name])], check=True)
    caches["images"].mkdir()
    data = [arg for setting, name in (("ml_env_cache_dir", "ml_env"), ("hf_control_cache_dir", "hf"),
                                      ("image_cache_dir", "images"))
            for arg in ("--data", f"{setting}={caches[name]}")]
    return caches, data


def running(fleet, record) -> dict:
    """The host's current release, active env and the reranker's image id."""
    image = fleet.ssh(record, f"docker ps -q --filter label=com.docker.compose.project={PROJECT} "
                              "--filter label=com.docker.compose.service=reranker | xargs -r docker inspect -f "
                              "'{{.Image}}'").strip()
    return {"release": fleet.ssh(record, f"readlink {RELEASES}/current").strip(), "env": active(fleet, record),
            "image": image}


def host_listing(fleet, record) -> str:
    """Every path the deploy keeps on the host (name, inode, links, size, mtime) and every image id."""
    return fleet.ssh(record, f"find {RELEASES} {ENV_DIR} /srv/mlstack/hf-cache -printf '%p %i %n %s %T@\\n' | sort; "
                             "docker images -aq --no-trunc | sort")


def cache_listing(caches: dict[str, Path]) -> list[str]:
    return sorted(f"{path} {path.lstat().st_size} {path.lstat().st_mtime_ns}"
                  for cache in caches.values() for path in cache.rglob("*"))


def has(fleet, record, path: str) -> bool:
    return fleet.ssh(record, f"test -e {path} && echo yes || echo no").strip() == "yes"


def holds_image(fleet, record, image_id: str) -> bool:
    return fleet.ssh(record, f"docker image inspect {image_id} >/dev/null 2>&1 && echo yes || echo no").strip() == "yes"


def test_prune_keeps_the_last_releases_and_removes_only_what_the_oldest_alone_used(fleet, tmp_path):
    fleet.wipe()
    caches, data = private_caches(tmp_path)
    commits = hub.ensure_repos()
    v1, main = commits[hub.NESTED]["v1"], commits[hub.NESTED]["main"]
    old_models = json.dumps([{"repo_id": hub.MINILM, "revision": commits[hub.MINILM]["main"]},
                             {"repo_id": hub.NESTED, "revision": v1}])
    releases = []  # per deploy: host -> what runs
    for version, extra in (("a", ["--data", f"models={old_models}"]),
                           ("b", ["--data", new_requirements(tmp_path)]),
                           ("c", ["--data", new_requirements(tmp_path)])):
        # versions of its own: an image another module built (day two's "a") would already be on the builder
        run = fleet.deploy(*data, "--data", f"stack={project_copy(tmp_path, f'prune-{version}')}", *extra)
        assert run.returncode == 0, run.output[-3000:]
        releases.append({record.name: running(fleet, record) for record in fleet.hosts})
    a, b, c = releases
    for record in fleet.hosts:  # the oldest release alone uses its env, the nested model at v1 and its image
        old, kept, new = a[record.name], b[record.name], c[record.name]
        assert old["env"] != kept["env"] == new["env"] and len({old["image"], kept["image"], new["image"]}) == 3
        assert has(fleet, record, f"{NESTED_FOLDER}/snapshots/{v1}")
        assert has(fleet, record, f"{ENV_DIR}/envs/{old['env']}")
    old_env, old_release = a["host1"]["env"], a["host1"]["release"]
    tag = fleet.ssh(fleet.hosts[0], "docker image inspect -f '{{index .RepoTags 0}}' " + a["host1"]["image"]).strip()
    old_archive = caches["images"] / f"{tag.replace(':', '-')}.tar.gz"  # as the deploy names a built image's archive
    assert old_archive.exists() and (caches["ml_env"] / f"{old_env}.tar.gz").exists()

    hosts_before = {record.name: host_listing(fleet, record) for record in fleet.hosts}
    caches_before = cache_listing(caches)
    dry = mlstack(fleet, "prune", "inventory/rehearsal.py", "--keep", "2", "--dry", *data)
    assert dry.returncode == 0, dry.stdout + dry.stderr[-3000:]
    print(dry.stdout)  # shown with pytest -rP
    assert {record.name: host_listing(fleet, record) for record in fleet.hosts} == hosts_before
    assert cache_listing(caches) == caches_before
    for record in fleet.hosts:
        old = a[record.name]
        section = dry.stdout.split(f"\n{record.name} ", 1)[1].split("\nhost", 1)[0].split("\n\ncontrol caches", 1)[0]
        assert f"remove   release {old['release']}" in section
        assert f"remove   env {old['env']}" in section
        assert f"remove   model models--mlstack-test--nested-tiny@{v1[:12]}" in section
        assert f"remove   image {old['image'][:19]}" in section
        assert [line.split()[1] for line in section.splitlines() if line.lstrip().startswith("remove ")] == [
            "release", "env", "model", "image"]  # and nothing a kept release uses
    assert f"ml_env  env {old_env}" in dry.stdout and f"archive {old_archive.name}" in dry.stdout
    assert f"model models--mlstack-test--nested-tiny@{v1[:12]}" in dry.stdout.split("control caches", 1)[1]

    run = mlstack(fleet, "prune", "inventory/rehearsal.py", "--keep", "2", *data)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    print(run.stdout)
    for record in fleet.hosts:
        old, kept, new = a[record.name], b[record.name], c[record.name]
        listed = fleet.ssh(record, f"ls {RELEASES}").split()
        assert sorted(listed) == sorted(["current", kept["release"], new["release"]])
        assert fleet.ssh(record, f"ls {ENV_DIR}/envs").split() == [new["env"]]
        assert fleet.ssh(record, f"ls {NESTED_FOLDER}/snapshots").split() == [main]
        assert not holds_image(fleet, record, old["image"])
        assert holds_image(fleet, record, kept["image"]) and holds_image(fleet, record, new["image"])
        assert fleet.ssh(record, f"find {ENV_DIR}/objects -links 1 | wc -l").strip() == "0"  # collected
        assert running(fleet, record) == new  # the running release untouched
    assert not any((caches["ml_env"] / name).exists() for name in (f"{old_env}.tar.gz", f"{old_env}.json",
                                                                    f"trees/{old_env}.json"))
    assert (caches["ml_env"] / f"{b['host1']['env']}.tar.gz").exists() and not old_archive.exists()
    assert not (caches["hf"] / "models--mlstack-test--nested-tiny/snapshots" / v1).exists()
    assert (caches["hf"] / "models--mlstack-test--nested-tiny/snapshots" / main).exists()
    assert old_release in run.stdout and "removed  release" in run.stdout

    again = mlstack(fleet, "prune", "inventory/rehearsal.py", "--keep", "2", *data)
    assert again.returncode == 0 and "removed 0; freed 0 B" in again.stdout, again.stdout + again.stderr[-3000:]

    sent = {record.name: sent_to(fleet, record) for record in fleet.hosts}
    back = mlstack(fleet, "rollback", "inventory/rehearsal.py", "--canary", "0")
    assert back.returncode == 0, back.stdout + back.stderr[-3000:]
    for record in fleet.hosts:
        assert running(fleet, record) == b[record.name]  # its env, image and snapshots were all still there
        assert sent_to(fleet, record) - sent[record.name] < 1_000_000  # nothing built or sent
