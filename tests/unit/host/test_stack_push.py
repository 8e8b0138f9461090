"""The project push's host programs, run here on scratch compose directories with a fake docker: the modes the
project's files keep (control side: `shipped_mode`, `project_tar`), file <-> directory changes checked before
anything moves (files/host/install_project.sh), each run's own staging name and the compose directory's lock
(stage_project.sh, stack_locked.sh), and `compose down` as a program (bring_down.sh)."""

import fcntl
import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from tasks.control.compose_project import _project_modes, shipped_mode
from tasks.host.programs import program, program_text
from tasks.host.stack_push import STAGE, bring_down, project_tar, push_project, stack_locked
from tasks.host.stack_render import MANIFEST, Rendered, mode_lines
from tasks.rollback import restore_project

COMPOSE = b"services:\n  app:\n    image: busybox\n"


def fake_docker(tmp_path: Path) -> dict[str, str]:
    """An environment whose `docker` records its directory and arguments in tmp_path/docker-calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    docker = bin_dir / "docker"
    docker.write_text(f'#!/bin/sh\necho "$PWD $*" >> {tmp_path}/docker-calls\n')
    docker.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def rendered(files: dict[str, bytes], modes: dict[str, int] | None = None, dotenv: str = "A=1\n") -> Rendered:
    manifest = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in sorted(files.items()))
    return Rendered("", dotenv, "# salt x\n", files, manifest + mode_lines(modes or {}), {}, modes or {})


def sh(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, timeout=60, env=env)


def push(compose: Path, env: dict[str, str], files: dict[str, bytes], modes: dict[str, int] | None = None,
         dotenv: str = "A=1\n", wait: int = 5) -> subprocess.CompletedProcess:
    """What push_project does on a host: this run's stage made, the project's tar written there, the install."""
    compose.mkdir(exist_ok=True)
    made = sh(program("stage_project.sh", str(compose), STAGE), env)
    assert made.returncode == 0, made.stderr
    (compose / STAGE / "project.tar").write_bytes(project_tar(rendered(files, modes, dotenv)))
    return sh(program("stack_locked.sh", str(compose), wait, "install_project.sh", program_text("install_project.sh"),
                      str(compose), STAGE), env)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


@pytest.mark.parametrize(("source", "shipped"), [(0o600, 0o600), (0o640, 0o640), (0o644, 0o644), (0o666, 0o644),
                                                 (0o664, 0o644), (0o700, 0o700), (0o750, 0o750), (0o755, 0o755),
                                                 (0o777, 0o755), (0o444, 0o644), (0o4755, 0o755)])
def test_a_project_file_keeps_its_sources_read_and_execute_bits_never_write_for_others(source, shipped):
    assert shipped_mode(0o100000 | source) == shipped


def test_the_project_read_on_the_control_node_gives_each_file_its_mode(tmp_path):
    for name, source in {"compose.yaml": 0o664, "secrets/db_password": 0o600, "bin/start.sh": 0o755}.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
        (tmp_path / name).chmod(source)
    assert _project_modes(tmp_path) == {"bin/start.sh": 0o755, "compose.yaml": 0o644, "secrets/db_password": 0o600}


def test_the_pushed_tar_carries_each_files_mode_and_the_manifest_records_them():
    out = rendered({"compose.yaml": COMPOSE, "secrets/db": b"pw", "run.sh": b"#!/bin/sh\n"},
                   {"secrets/db": 0o600, "run.sh": 0o755})
    with tarfile.open(fileobj=io.BytesIO(project_tar(out))) as archive:
        modes = {member.name: member.mode for member in archive.getmembers()}
    assert modes == {"compose.yaml": 0o644, "secrets/db": 0o600, "run.sh": 0o755, ".env": 0o600,
                     ".env.digest": 0o600, MANIFEST: 0o644}
    assert out.manifest.endswith("# mode 0755 run.sh\n# mode 0600 secrets/db\n")


def test_a_0600_file_arrives_0600_and_sha256sum_still_checks_the_manifest(tmp_path):
    env, compose = fake_docker(tmp_path), tmp_path / "compose"
    result = push(compose, env, {"compose.yaml": COMPOSE, "secrets/db": b"pw", "run.sh": b"#!/bin/sh\n"},
                  {"secrets/db": 0o600, "run.sh": 0o755})
    assert result.returncode == 0, result.stderr
    assert {name: mode(compose / name) for name in ("compose.yaml", "secrets/db", "run.sh", ".env")} == {
        "compose.yaml": 0o644, "secrets/db": 0o600, "run.sh": 0o755, ".env": 0o600}
    check = subprocess.run(["sha256sum", "-c", "--strict", "--quiet", MANIFEST], cwd=compose, capture_output=True)
    assert check.returncode == 0 and check.stdout == b"" and check.stderr == b""


def test_a_directory_that_becomes_a_file_is_replaced_by_the_file(tmp_path):
    env, compose = fake_docker(tmp_path), tmp_path / "compose"
    assert push(compose, env, {"compose.yaml": COMPOSE, "config/app.yml": b"a: 1\n", "config/sub/b": b"b"}
                ).returncode == 0
    result = push(compose, env, {"compose.yaml": COMPOSE, "config": b"now a file\n"})
    assert result.returncode == 0, result.stderr
    assert (compose / "config").read_bytes() == b"now a file\n"
    assert sorted(path.name for path in compose.iterdir()) == [".env", ".env.digest", ".mlstack-files",
                                                               ".mlstack-lock", "compose.yaml", "config"]


def test_a_file_that_becomes_a_directory_is_replaced_by_the_directory(tmp_path):
    env, compose = fake_docker(tmp_path), tmp_path / "compose"
    assert push(compose, env, {"compose.yaml": COMPOSE, "config": b"a file\n"}).returncode == 0
    result = push(compose, env, {"compose.yaml": COMPOSE, "config/app.yml": b"a: 2\n"}, dotenv="A=2\n")
    assert result.returncode == 0, result.stderr
    assert (compose / "config/app.yml").read_bytes() == b"a: 2\n" and (compose / ".env").read_text() == "A=2\n"


@pytest.mark.parametrize(("planted", "pushed"), [("data/own.txt", "data"), ("logs", "logs/app.yml")])
def test_a_name_the_deploy_did_not_place_in_the_way_stops_the_install_with_nothing_changed(tmp_path, planted,
                                                                                          pushed):
    env, compose = fake_docker(tmp_path), tmp_path / "compose"
    assert push(compose, env, {"compose.yaml": COMPOSE, "old.yml": b"old"}).returncode == 0
    (compose / planted).parent.mkdir(exist_ok=True)
    (compose / planted).write_text("someone's own")
    before = {path: path.read_bytes() for path in compose.rglob("*") if path.is_file()}
    result = push(compose, env, {"compose.yaml": COMPOSE + b"  # v2\n", pushed: b"new"}, dotenv="A=2\n")
    assert result.returncode == 1
    what = "a directory holding files the deploy did not place" if pushed == "data" else \
        "not a directory of the deploy's"
    assert result.stderr.strip().endswith(f"install_project.sh: {pushed.partition('/')[0]} in {compose} is {what} "
                                          f"where the project has a {'file' if pushed == 'data' else 'directory'}; "
                                          "nothing was changed: move it away, then run again")
    after = {path: path.read_bytes() for path in compose.rglob("*") if path.is_file() and STAGE not in str(path)}
    assert after == before


def test_a_directory_someone_made_where_a_dropped_file_was_is_left_and_the_push_goes_on(tmp_path):
    env, compose = fake_docker(tmp_path), tmp_path / "compose"
    assert push(compose, env, {"compose.yaml": COMPOSE, "old.yml": b"old", "gone.yml": b"gone"}).returncode == 0
    (compose / "old.yml").unlink()
    (compose / "old.yml").mkdir()
    (compose / "old.yml/theirs").write_text("theirs")
    result = push(compose, env, {"compose.yaml": COMPOSE + b"  # v2\n"})
    assert result.returncode == 0, result.stderr
    assert (compose / "old.yml/theirs").read_text() == "theirs" and not (compose / "gone.yml").exists()
    assert (compose / "compose.yaml").read_bytes() == COMPOSE + b"  # v2\n"


def test_what_earlier_runs_left_is_removed_and_the_stage_is_this_runs_own(tmp_path):
    env, compose = fake_docker(tmp_path), tmp_path / "compose"
    compose.mkdir()
    for leftover in (".next/tree", ".next-0badc0de/tree"):
        (compose / leftover).mkdir(parents=True)
    (compose / ".image.tar.gz").write_text("old")
    (compose / ".image-0badc0de.tar.gz").write_text("old")
    assert STAGE.startswith(".next-") and STAGE != ".next-0badc0de"
    result = push(compose, env, {"compose.yaml": COMPOSE})
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in compose.iterdir()) == [".env", ".env.digest", ".mlstack-files",
                                                               ".mlstack-lock", "compose.yaml"]
    assert sh(program("stage_project.sh", str(compose), ".env"), env).returncode == 1  # never an existing name


def test_an_install_waits_for_the_lock_an_earlier_runs_step_holds_and_leaves_its_stage_alone(tmp_path):
    env, compose = fake_docker(tmp_path), tmp_path / "compose"
    compose.mkdir()
    (compose / ".next-0badc0de").mkdir()
    with open(compose / ".mlstack-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # an orphaned install or `compose up` of an earlier run
        result = push(compose, env, {"compose.yaml": COMPOSE}, wait=1)
        assert result.returncode == 1
        assert result.stderr.strip() == (f"install_project.sh: a step of an earlier run (its connection lost) still "
                                         f"holds {compose}/.mlstack-lock after 1s: let it end, then run again")
        assert (compose / ".next-0badc0de").is_dir() and not (compose / "compose.yaml").exists()
    result = sh(stack_locked(str(compose), "install_project.sh", str(compose), STAGE), env)
    assert result.returncode == 0, result.stderr
    assert (compose / "compose.yaml").read_bytes() == COMPOSE and not (compose / ".next-0badc0de").exists()


def test_bring_down_runs_compose_down_by_the_projects_name_in_the_compose_directory(tmp_path):
    env, compose = fake_docker(tmp_path), tmp_path / "compose"
    compose.mkdir()
    (command,) = bring_down._inner(project="old; touch /tmp/x", compose_dir=str(compose))
    assert command == stack_locked(str(compose), "bring_down.sh", str(compose), "old; touch /tmp/x")
    result = sh(command, env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "docker-calls").read_text() == f"{compose} compose -p old; touch /tmp/x down --remove-orphans\n"


def test_push_project_stages_in_this_runs_own_directory():
    commands = list(push_project._inner(compose_dir="/srv/compose", rendered=rendered({"compose.yaml": COMPOSE})))
    assert commands[0] == program("stage_project.sh", "/srv/compose", STAGE)
    assert commands[1].dest == f"/srv/compose/{STAGE}/project.tar"
    assert commands[2] == stack_locked("/srv/compose", "install_project.sh", "/srv/compose", STAGE)


def test_a_release_keeps_the_modes_and_a_rollback_puts_them_back(tmp_path):
    """releases.sh record copies what .mlstack-files names (its `# mode` lines are no paths); restore_project
    stages the release under the run's own name and installs it as a push does."""
    env, compose, releases = fake_docker(tmp_path), tmp_path / "compose", tmp_path / "releases"
    files = {"compose.yaml": COMPOSE, "secrets/db": b"pw-1"}
    assert push(compose, env, files, {"secrets/db": 0o600}).returncode == 0
    recorded = sh(program("releases.sh", "record", str(releases), "rel-1", str(compose), "p", "{}"), env)
    assert recorded.returncode == 0, recorded.stderr
    assert mode(releases / "rel-1/project/secrets/db") == 0o600
    assert push(compose, env, {**files, "secrets/db": b"pw-2"}).returncode == 0
    assert mode(compose / "secrets/db") == 0o644  # this version's source was 0644
    for command in restore_project._inner(releases_dir=str(releases), release="rel-1", compose_dir=str(compose)):
        result = sh(command, env)
        assert result.returncode == 0, result.stderr
    assert (compose / "secrets/db").read_bytes() == b"pw-1" and mode(compose / "secrets/db") == 0o600
    assert (compose / MANIFEST).read_text().endswith("# mode 0600 secrets/db\n")
