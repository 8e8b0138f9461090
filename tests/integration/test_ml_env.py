"""The ML env on a real 2-host fleet: build once, install atomically, check imports, switch, GC, roll back."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from fleet_helpers import ENV_DIR, active, envs_on, requirements_file, sent_to

from rehearsal.baseimage import IMAGE_NAME
from rehearsal.index import WHEELHOUSE, add_to_wheelhouse
from tasks.control.env_store import read_tree, tree_objects
from tasks.host.ml_env import runtime_environment

FILES = Path(__file__).parents[2] / "files"
REHEARSAL = (FILES / "requirements.rehearsal.txt").read_text()  # what the rehearsal's reranker imports
ENV_LINE = re.compile(r"\[(host\d+)\] ML env: (none|env-[0-9a-f]{16}) → (env-[0-9a-f]{16})")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One control cache for the module: the rehearsal env is built once, by whichever test needs it first."""
    return tmp_path_factory.mktemp("ml-env-cache")


@pytest.fixture(autouse=True)
def fresh_hosts(fleet):
    fleet.wipe("/srv/evil")


def deploy(fleet, cache, *data: str, user: str = "root"):
    args = [arg for item in data for arg in ("--data", item)]
    return fleet.deploy("--data", f"ml_env_cache_dir={cache}", *args, env={"MLSTACK_FLEET_USER": user})


def switched_to(run) -> set[str]:
    return {new for _, _, new in ENV_LINE.findall(run.output)}


def test_first_deploy_installs_the_env_everywhere_and_the_rerun_builds_and_sends_nothing(fleet, tmp_path):
    cache = tmp_path / "fresh-cache"
    first = deploy(fleet, cache, "ml_env_dir_uid=1234", "ml_env_dir_gid=2345")
    assert first.returncode == 0, first.output[-3000:]
    (env,) = switched_to(first)
    assert first.output.count("): building from") == 1  # once for the fleet, not once per host
    assert re.search(rf"ML env {env} \(recipe-[0-9a-f]{{16}}\): [\d.]+ MB artifact", first.output)
    assert sorted(p.name for p in cache.glob("env-*")) == [f"{env}.json", f"{env}.tar.gz"]
    manifest = json.loads((cache / f"{env}.json").read_text())

    site = f"/root/.local/lib/{manifest['python']}/site-packages"
    environment = " ".join(f"-e {key}={value}" for key, value in runtime_environment(manifest["python"]).items())
    before = {}
    for record in fleet.hosts:
        assert active(fleet, record) == env and envs_on(fleet, record) == [env]
        # Every file of the env carries the configured numeric owner; nothing is left in flight.
        assert fleet.ssh(record, f"find {ENV_DIR}/envs/{env} ! -user 1234 -o ! -group 2345 | head -3") == ""
        assert fleet.ssh(record, f"ls -A {ENV_DIR}/incoming") == ""
        output = fleet.ssh(record, f"docker run --rm --network none -v {ENV_DIR}/envs/{env}:/root/.local:ro "
                                   f"{environment} {IMAGE_NAME} python3 -c "
                                   "'import yaml, tokenizers, huggingface_hub; print(yaml.__file__)'")
        assert output.strip() == f"{site}/yaml/__init__.py"
        before[record.name] = fleet.ssh(record, f"stat -c '%i %Y' {ENV_DIR}/envs/{env} "
                                                f"{ENV_DIR}/envs/{env}/.mlstack-env.json")
    artifact = (cache / f"{env}.tar.gz").stat()

    second = deploy(fleet, cache, "ml_env_dir_uid=1234", "ml_env_dir_gid=2345")
    assert second.returncode == 0, second.output[-3000:]
    assert second.changed_operations() == []
    assert "building" not in second.output and "MB sent" not in second.output
    assert f"[host1] ML env: {env} (no change)" in second.output
    for record in fleet.hosts:
        assert fleet.ssh(record, f"stat -c '%i %Y' {ENV_DIR}/envs/{env} "
                                 f"{ENV_DIR}/envs/{env}/.mlstack-env.json") == before[record.name]
    assert (cache / f"{env}.tar.gz").stat().st_ino == artifact.st_ino
    assert (cache / f"{env}.tar.gz").stat().st_mtime_ns == artifact.st_mtime_ns


def objects_on(fleet, record) -> set[str]:
    return set(fleet.ssh(record, f"ls {ENV_DIR}/objects").split())


def inodes(fleet, record, *paths: str) -> set[str]:
    return set(fleet.ssh(record, "stat -c %i " + " ".join(f"{ENV_DIR}/{path}" for path in paths)).split())


@pytest.mark.heavy
def test_a_new_env_sends_only_its_new_files_shares_the_rest_keep_envs_collects_and_a_pin_rolls_back(
        fleet, cache, tmp_path):
    a = deploy(fleet, cache, "keep_envs=1")
    (env_a,) = switched_to(a)
    tree_a = read_tree(cache, env_a)
    whole = sum(tree_objects(tree_a).values())
    assert whole > 20e6  # the rehearsal env: what a whole-env transfer would send again

    requirements_b = requirements_file(tmp_path, "b.txt", REHEARSAL + "packaging\n")
    dry = fleet.deploy("--dry", "--data", f"ml_env_cache_dir={cache}", "--data", requirements_b)
    assert dry.returncode == 0, dry.output[-3000:]
    (env_b,) = switched_to(dry)
    # The new env's id names what pip installs, so the dry run builds it on the builder: no host changes.
    tree_b = read_tree(cache, env_b)
    new_files = {name: size for name, size in tree_objects(tree_b).items() if name not in tree_objects(tree_a)}
    assert 0 < len(new_files) < 10  # packaging's REQUESTED and RECORD, the env's own info file
    assert f"[host2] ML env: {env_a} → {env_b} ({sum(new_files.values()) / 1e6:.1f} MB to upload)" in dry.output
    assert [active(fleet, record) for record in fleet.hosts] == [env_a, env_a]
    assert [envs_on(fleet, record) for record in fleet.hosts] == [[env_a], [env_a]]

    before = {record.name: sent_to(fleet, record) for record in fleet.hosts}
    b = deploy(fleet, cache, "keep_envs=1", requirements_b)
    assert b.returncode == 0, b.output[-3000:]
    assert "building" not in b.output  # the dry run's build, used as it is
    shared = "lib/python3.11/site-packages/tokenizers/tokenizers.abi3.so"
    assert tree_a[shared] == tree_b[shared]
    for record in fleet.hosts:
        sent = sent_to(fleet, record) - before[record.name]
        assert sent < whole / 20, sent  # the new files, the manifest's entries and the deploy's own commands
        assert re.search(rf"\[{record.name}\] ML env {env_b}: {len(new_files)} new file\(s\), [\d.]+ MB, and "
                         rf"{len(tree_b)} entries", b.output)
        assert active(fleet, record) == env_b and sorted(envs_on(fleet, record)) == sorted([env_a, env_b])
        # one file, one object: both envs' paths are hard links to it
        assert len(inodes(fleet, record, f"envs/{env_a}/{shared}", f"envs/{env_b}/{shared}",
                          f"objects/{tree_b[shared].ref}")) == 1
        assert objects_on(fleet, record) == set(tree_objects(tree_a)) | set(tree_objects(tree_b))

    # As the sudo user this time: the upload goes through sudo, the import check runs docker through sudo.
    c = deploy(fleet, cache, "keep_envs=1", requirements_file(tmp_path, "c.txt", REHEARSAL + "tqdm\n"), user="deploy")
    assert c.returncode == 0, c.output[-3000:]
    (env_c,) = switched_to(c)
    tree_c = read_tree(cache, env_c)
    for record in fleet.hosts:
        assert active(fleet, record) == env_c and sorted(envs_on(fleet, record)) == sorted([env_b, env_c])
        # env_a went, and with it exactly the objects only it used
        assert objects_on(fleet, record) == set(tree_objects(tree_b)) | set(tree_objects(tree_c))

    before = {record.name: sent_to(fleet, record) for record in fleet.hosts}
    rollback = deploy(fleet, cache, "keep_envs=1", f"ml_env_id={env_b}")
    assert rollback.returncode == 0, rollback.output[-3000:]
    assert f"[host1] ML env: {env_c} → {env_b} (on the host already)" in rollback.output
    assert "building" not in rollback.output and "MB sent" not in rollback.output
    for record in fleet.hosts:
        assert sent_to(fleet, record) - before[record.name] < 1e6  # the deploy's own commands only
        assert active(fleet, record) == env_b and sorted(envs_on(fleet, record)) == sorted([env_b, env_c])


def broken_wheel(path: Path) -> Path:
    """A real wheel whose module fails to import, as a CUDA build does on a host without the driver."""
    wheel = path / "mlstack_broken_import-1.0-py3-none-any.whl"
    files = {
        "mlstack_broken_import/__init__.py": "raise ImportError('libcuda.so.1: cannot open shared object file')\n",
        "mlstack_broken_import-1.0.dist-info/METADATA":
            "Metadata-Version: 2.1\nName: mlstack-broken-import\nVersion: 1.0\n",
        "mlstack_broken_import-1.0.dist-info/WHEEL":
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        "mlstack_broken_import-1.0.dist-info/top_level.txt": "mlstack_broken_import\n",
    }
    record = "".join(f"{name},,\n" for name in files) + "mlstack_broken_import-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in {**files, "mlstack_broken_import-1.0.dist-info/RECORD": record}.items():
            archive.writestr(name, text)
    return wheel


@pytest.mark.heavy
def test_an_env_that_does_not_import_fails_with_the_error_and_the_old_env_stays_active(fleet, cache, tmp_path):
    good = deploy(fleet, cache)
    (env_good,) = switched_to(good)
    wheel = broken_wheel(WHEELHOUSE)
    try:
        bad = deploy(fleet, cache, requirements_file(tmp_path, "bad.txt", "pyyaml>=6\nmlstack-broken-import==1.0\n"))
    finally:
        wheel.unlink()
    assert bad.returncode != 0
    (env_bad,) = switched_to(bad)
    for record in fleet.hosts:
        assert f"[{record.name}] ML env {env_bad} does not import in the runtime image:\n" in bad.output
        assert (f"[{record.name}]   mlstack_broken_import (from mlstack-broken-import): "
                "ImportError: libcuda.so.1: cannot open shared object file") in bad.output
        assert active(fleet, record) == env_good
        assert sorted(envs_on(fleet, record)) == sorted([env_bad, env_good])  # installed, never switched to


def evil_artifact(cache: Path, env: str) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name in ("lib/python3.11/site-packages/ok.py", "../../evil"):
            info = tarfile.TarInfo(name)
            info.size = 3
            archive.addfile(info, io.BytesIO(b"x=1"))
    data = buffer.getvalue()
    (cache / f"{env}.tar.gz").write_bytes(data)
    (cache / f"{env}.json").write_text(json.dumps({
        "env_id": env, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "unpacked_size": 6,
        "files": 2, "python": "python3.11", "cuda_runtime": "", "torch": {}, "imports": {},
    }))


@pytest.mark.heavy
def test_an_artifact_with_an_escaping_member_is_refused_before_any_byte_is_sent(fleet, cache):
    env = deploy(fleet, cache)
    (env_good,) = switched_to(env)
    evil_artifact(cache, "env-00000000000e0e10")
    run = deploy(fleet, cache, "ml_env_id=env-00000000000e0e10")
    assert run.returncode != 0
    assert "archive member '../../evil' escapes the env directory" in run.output
    for record in fleet.hosts:
        assert active(fleet, record) == env_good
        assert envs_on(fleet, record) == [env_good]
        assert fleet.ssh(record, f"ls -A {ENV_DIR}/incoming;"
                                 " ls /srv/evil /srv/mlstack/evil 2>&1 | grep -c 'No such'") == "2\n"


def test_a_pin_to_an_unknown_env_fails_at_plan_time_and_changes_no_host(fleet, cache):
    run = deploy(fleet, cache, "ml_env_id=env-1111111111111111")
    assert run.returncode != 0
    assert re.search(r"host\d: ml_env_id = 'env-1111111111111111': "
                     r"this env is neither on the host nor in the control cache",
                     run.output)
    for record in fleet.hosts:
        assert fleet.ssh(record, "ls /srv/mlstack 2>&1 || true").strip().endswith("No such file or directory")


@pytest.mark.slow
def test_the_cuda_production_env_is_built_once_and_imports_on_every_host(fleet, tmp_path, capsys):
    """files/requirements.ml.txt as shipped: torch's CUDA build with its nvidia-* wheels, transformers,
    sentence-transformers, openai. The rehearsal hosts have no GPU, so the gate is skipped and the env
    must still import there. Prints the figures the README records."""
    add_to_wheelhouse(FILES / "requirements.ml.txt")
    started = time.monotonic()
    run = deploy(fleet, tmp_path / "cache", "ml_env_requirements=requirements.ml.txt")
    took = time.monotonic() - started
    assert run.returncode == 0, run.output[-3000:]
    (env,) = switched_to(run)
    manifest = json.loads((tmp_path / "cache" / f"{env}.json").read_text())
    assert set(manifest["imports"]) == {"torch", "transformers", "sentence-transformers", "openai"}
    assert manifest["cuda_runtime"] == "13.0.96"  # the nvidia-cuda-runtime wheel torch 2.14.1 pulls
    assert manifest["torch"]["cuda"] == "13.0" and "sm_90" in manifest["torch"]["archs"]
    environment = " ".join(f"-e {key}={value}" for key, value in runtime_environment(manifest["python"]).items())
    for record in fleet.hosts:
        output = fleet.ssh(record, f"docker run --rm --network none -v {ENV_DIR}/envs/{env}:/root/.local:ro "
                                   f"{environment} {IMAGE_NAME} python3 -c 'import sentence_transformers, torch; "
                                   "print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), "
                                   "sentence_transformers.__file__)'")
        version, cuda, available, location = output.split()
        assert (version, cuda, available) == ("2.14.1+cu130", "13.0", "False")  # no GPU in a rehearsal host
        assert location.startswith("/root/.local/lib/")
    installed = fleet.ssh(fleet.hosts[0], f"du -sb {ENV_DIR}/envs/{env} | cut -f1; "
                                          f"find {ENV_DIR}/envs/{env} -type f | wc -l").split()
    built = re.search(r"ML env env-[0-9a-f]{16} \(recipe-[0-9a-f]{16}\): ([0-9.]+) MB artifact, (\d+) files, "
                      r"\d+ packages, built in (\d+)s", run.output)
    assert built, run.output[-3000:]
    with capsys.disabled():
        print(f"\nCUDA production env {env}: {int(installed[0]) / 1e9:.2f} GB installed, {installed[1]} files; "
              f"artifact {float(built[1]) / 1e3:.2f} GB; built in {built[3]}s; "
              f"whole deploy (build, then install on {len(fleet.hosts)} hosts) {took:.0f}s")


@pytest.mark.heavy
def test_an_env_a_container_of_another_project_mounts_outlives_keep_envs(fleet, cache, tmp_path):
    a = deploy(fleet, cache, "keep_envs=0")
    assert a.returncode == 0, a.output[-3000:]
    (env_a,) = switched_to(a)
    holder, other = fleet.hosts
    # Not the stack's: a container of its own (no compose project) that mounts env A read-only.
    fleet.ssh(holder, f"docker run -d --name other-team --network none -v {ENV_DIR}/envs/{env_a}:/env:ro "
                      f"--entrypoint '' {IMAGE_NAME} sleep 600 >/dev/null")
    try:
        b = deploy(fleet, cache, "keep_envs=0", requirements_file(tmp_path, "b.txt", REHEARSAL + "packaging\n"))
        assert b.returncode == 0, b.output[-3000:]
        (env_b,) = switched_to(b)
        assert sorted(envs_on(fleet, holder)) == sorted([env_a, env_b])  # still mounted: kept
        assert envs_on(fleet, other) == [env_b]
    finally:
        fleet.ssh(holder, "docker rm -f other-team >/dev/null")
    again = deploy(fleet, cache, "keep_envs=0", requirements_file(tmp_path, "b.txt", REHEARSAL + "packaging\n"))
    assert again.returncode == 0, again.output[-3000:]
    assert envs_on(fleet, holder) == [env_b]  # no longer mounted: removed
