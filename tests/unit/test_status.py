"""`mlstack status` and `mlstack logs`, their pure parts: the drift word from what a host says, the host program
that reads the deploy lock without taking it, the table and the JSON, the prefixed log lines and the options
that reach compose (untrusted input)."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from tasks import status as status_module
from tasks.config import HostConfig, ModelSpec
from tasks.fleet.day_two import LogOptions, host_order, logs_main, prefixed, status_table, statuses, unread_status
from tasks.fleet.runner import DeployRun
from tasks.host.ml_env import NoEnv
from tasks.host.models import ModelCacheState, RepoCacheState
from tasks.host.programs import program
from tasks.host.releases import ReleasesState, new_release
from tasks.host.stack import release_of
from tasks.host.stack_render import Rendered
from tasks.status import Container, HostState, Read, ServiceLogsFact, StatusFact, drift, host_status, model_states

FILES = "f" * 64  # the sha256 of the compose directory's .mlstack-files and .env.digest, as the probe says it
IMAGE_ID = "sha256:" + "ab" * 32
COMMIT = "c" * 40
MODELS = [ModelSpec(repo_id="org/model", revision="main"), ModelSpec(repo_id="org/pinned", revision=COMMIT),
          ModelSpec(repo_id="org/absent")]
CONFIG = SimpleNamespace(models=MODELS)  # all model_states reads of a HostConfig
UP = {("shop", "web"): Container("running", "healthy")}


def release(files: str = FILES, services=("web",)):
    made = new_release("shop", files, "env-0123456789abcdef", {"models--org--model": COMMIT},
                       {name: f"shop-{name}:1" for name in services}, "s" * 16)
    return replace(made, activated="2026-12-07T04:00:00Z", image_ids={name: IMAGE_ID for name in services})


def on_host(**seen) -> HostState:
    return HostState(**{"lock": "free", "files": FILES, "dotenv": "same", "containers": UP, "project": "shop",
                        **seen})


def read(current=None, kept=(), **seen) -> Read:
    releases = {kept_one.id: kept_one for kept_one in (*kept, *([current] if current else []))}
    return Read(releases=ReleasesState(releases, current.id if current else None), host=on_host(**seen))


def test_a_host_that_runs_its_current_release_as_recorded_is_ok():
    assert drift(read(release())) == ("ok", [])


def test_no_release_recorded_is_none_whatever_runs():
    assert drift(read(None))[0] == "none"
    assert drift(read(None, containers={}))[0] == "none"


@pytest.mark.parametrize(("state", "health", "says"), [
    ("exited", "", "web exited"), ("running", "unhealthy", "web running (unhealthy)"),
    ("running", "starting", "web running (starting)"), (None, None, "web missing"),
])
def test_a_service_of_the_release_missing_not_running_or_not_healthy_is_degraded(state, health, says):
    containers = {} if state is None else {("shop", "web"): Container(state, health)}
    assert drift(read(release(), containers=containers)) == ("degraded", [says])


def test_a_running_service_without_a_healthcheck_counts_as_up():
    assert drift(read(release(), containers={("shop", "web"): Container("running")}))[0] == "ok"


def test_the_services_are_the_current_releases_project_else_the_one_the_compose_directory_names():
    """After a deploy of another project, or a rollback to a release of another project, the host runs the
    current release's project; without a release, the project its compose directory's .env names."""
    containers = {**UP, ("greeter", "greeter"): Container("exited")}
    assert host_status(CONFIG, read(release(), project="greeter", containers=containers))["services"] == {
        "web": {"state": "running", "health": "healthy"}}
    assert host_status(CONFIG, read(None, project="greeter", containers=containers))["services"] == {
        "greeter": {"state": "exited", "health": ""}}
    assert host_status(CONFIG, read(None, project="", containers=containers))["services"] == {}


def test_project_files_or_env_values_other_than_the_releases_are_modified():
    current = release()
    assert drift(read(current, files="1" * 64)) == (
        "modified", [f"the compose project's files or .env values are not {current.id}'s"])
    assert drift(read(current, files=None))[0] == "modified"  # the manifest or the digest is gone
    by_hand = ("compose.yaml", "api/app.py (missing)")
    assert drift(read(current, changed=by_hand)) == (
        "modified", ["compose.yaml edited since the deploy", "api/app.py (missing) edited since the deploy"])
    assert drift(read(current, dotenv="differs")) == ("modified", [f".env differs from {current.id}'s"])


def test_degraded_comes_before_modified_and_every_problem_is_listed():
    word, problems = drift(read(release(), containers={}, dotenv="differs"))
    assert word == "degraded" and problems == ["web missing", f".env differs from {release().id}'s"]


def test_a_host_whose_releases_or_containers_could_not_be_read_is_unknown():
    assert drift(Read(errors=["releases: its program exited with status 3"]))[0] == "unknown"
    assert drift(replace(read(release()), host=None))[0] == "unknown"
    assert drift(read(release(), docker=False))[0] == "unknown"


def test_status_reads_a_hosts_settings_without_asking_docker_compose_and_stops_on_bad_ones(monkeypatch):
    def no_compose(*args, **kwargs):
        raise AssertionError("status read the compose project")

    def fleet_problems(host):
        raise RuntimeError(f"the fleet's problems, {host.name}'s among them")

    monkeypatch.setattr("tasks.control.compose_project.compose_config", no_compose)
    monkeypatch.setattr(status_module, "host_config", fleet_problems)
    data = {"stack": "reranker", "ssh_user": "ops", "_sudo": True, "compose_project_dir": "/srv/compose"}
    host = SimpleNamespace(name="gpu-01", data=SimpleNamespace(dict=lambda: data))
    assert status_module.settings(host).compose_project_dir == "/srv/compose"
    data["compose_project_dir"] = "relative/compose"
    with pytest.raises(RuntimeError, match="gpu-01's among them"):
        status_module.settings(host)


def test_models_at_the_commit_their_revision_names_on_the_host():
    repo = RepoCacheState({}, frozenset({COMMIT}), {}, {"main": COMMIT}, frozenset(), {}, ())
    pinned = RepoCacheState({}, frozenset(), {}, {}, frozenset(), {}, ())  # its snapshot is gone
    state = ModelCacheState({"models--org--model": repo, "models--org--pinned": pinned}, 0)
    assert model_states(CONFIG, state) == [
        {"repo_id": "org/model", "revision": "main", "commit": COMMIT, "present": True},
        {"repo_id": "org/pinned", "revision": COMMIT, "commit": None, "present": False},
        {"repo_id": "org/absent", "revision": "main", "commit": None, "present": False}]


def status_of(**kwargs) -> dict:
    older = replace(release(files="1" * 64), activated="2026-12-06T04:00:00Z")
    return host_status(CONFIG, read(release(), kept=(older,), **kwargs))


def test_the_status_names_the_current_release_the_kept_ones_and_the_lock():
    status = status_of(lock="held", holder="ci@control pid 42 since 2026-12-07T05:00:00Z", env="env-0123456789abcdef")
    assert status["release"] == {"id": release().id, "activated": "2026-12-07T04:00:00Z",
                                 "created": release().created, "control_node": release().control_node}
    assert status["releases"][-1] == release().id and len(status["releases"]) == 2
    assert status["lock"] == {"held": True, "holder": "ci@control pid 42 since 2026-12-07T05:00:00Z"}
    assert status["services"] == {"web": {"state": "running", "health": "healthy"}}
    assert status["env"] == "env-0123456789abcdef"
    assert json.loads(json.dumps(status)) == status  # what --json prints


def test_the_table_has_a_row_per_host_and_an_unreadable_host_says_why():
    run = DeployRun(0, "", 1.0, report={
        "host10": {"result": "failed", "failure": {"cause": "unreachable", "message": "timed out", "step": ""}},
        "host2": {"result": "ok", "status": status_of(lock="held", holder="ci@control pid 42", dotenv="differs")},
    })
    found = statuses(run)
    assert list(found) == ["host2", "host10"]
    assert found["host10"] == unread_status("unreachable: timed out")
    table = status_table(found).splitlines()
    assert table[0].split() == ["host", "drift", "release", "activated", "env", "lock", "services"]
    assert table[1].split() == ["host2", "modified", release().id, "2026-12-07T04:00:00Z", "-", "held", "web",
                                "healthy"]
    assert table[2].strip() == "deploy lock held: ci@control pid 42"
    assert any(line.strip() == f"modified: .env differs from {release().id}'s" for line in table)
    row = next(number for number, line in enumerate(table) if line.startswith("host10"))
    assert table[row].split()[:3] == ["host10", "unknown", "-"]
    assert table[row + 1].strip() == "not read: unreachable: timed out" and table[row + 2] == ""
    assert status_table(found).endswith("status: 2 host(s): unknown 1, modified 1")


def test_log_lines_are_prefixed_by_their_host_and_cannot_drive_the_terminal():
    assert prefixed("host1", ["INFO ready", "\x1b[2Jwiped\tscreen"], width=6) == [
        "host1  | INFO ready", "host1  | \\x1b[2Jwiped\tscreen"]
    assert host_order(["host10", "host2", "gpu-01"]) == ["gpu-01", "host2", "host10"]


@pytest.mark.parametrize("service", ["web", "reranker", "api.v2", "my_svc-1"])
def test_compose_service_names_pass(service):
    assert LogOptions(service, "42m", "100").problems() == []


@pytest.mark.parametrize(("options", "problem"), [
    (LogOptions("-rf"), "compose service name"), (LogOptions("web;reboot"), "compose service name"),
    (LogOptions("$(id)"), "compose service name"), (LogOptions(""), "compose service name"),
    (LogOptions("web", since="--until=1"), "a time"), (LogOptions("web", since="1h; id"), "a time"),
    (LogOptions("web", tail="-5"), "number of lines"), (LogOptions("web", tail="5 6"), "number of lines"),
])
def test_options_that_are_not_what_compose_reads_are_refused(options, problem):
    assert problem in " ".join(options.problems())


def test_the_cli_refuses_a_bad_service_name_before_any_host_is_asked(capsys):
    with pytest.raises(SystemExit) as exit_status:
        logs_main(["/nonexistent/inventory.py", "web$(reboot)"])
    assert exit_status.value.code == 2 and "compose service name" in capsys.readouterr().err


def fake_docker(tmp_path: Path) -> dict:
    """A `docker` on PATH whose project has the services web and api, and whose `compose logs` prints its
    arguments, one per line, the first after compose's erase-line sequence."""
    (tmp_path / "bin").mkdir()
    docker = tmp_path / "bin" / "docker"
    docker.write_text("#!/bin/sh\nif [ \"$2\" = config ]; then printf 'web\\napi\\n'; exit 0; fi\n"
                      "printf '\\033[2K'\nfor arg in \"$@\"; do echo \"arg $arg\"; done\necho 'to stderr' >&2\n")
    docker.chmod(0o755)
    return {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}


def test_the_logs_program_passes_each_option_as_one_argument_and_ends_with_composes_status(tmp_path):
    command = ServiceLogsFact().command(str(tmp_path), "web", "2026-12-07T04:00:00Z", "5", True)
    output = subprocess.run(["/bin/sh", "-c", command], env=fake_docker(tmp_path), capture_output=True, text=True,
                            timeout=30).stdout.splitlines()
    assert ServiceLogsFact().process(output) == (0, [
        "arg compose", "arg logs", "arg --no-color", "arg --timestamps", "arg --since", "arg 2026-12-07T04:00:00Z",
        "arg --tail", "arg 5", "arg --", "arg web", "to stderr"])  # the containers' stderr too


def test_a_service_the_project_does_not_have_is_an_error_not_an_empty_log(tmp_path):
    command = ServiceLogsFact().command(str(tmp_path), "we", "", "", False)
    output = subprocess.run(["/bin/sh", "-c", command], env=fake_docker(tmp_path), capture_output=True, text=True,
                            timeout=30).stdout.splitlines()
    assert ServiceLogsFact().process(output) == (1, ["no service we in the project (its services: web api)"])


def sent(lines: list[str]) -> list[str]:
    """LINES as a host sends them (tasks/host/probe.py `carried`: base64)."""
    return base64.encodebytes("".join(line + "\n" for line in lines).encode()).decode().splitlines()


def test_only_the_last_line_says_composes_status():
    fact = ServiceLogsFact()
    assert fact.process(sent(["@@mlstack-logs-status 0", "a line", "@@mlstack-logs-status 1"])) == (
        1, ["@@mlstack-logs-status 0", "a line"])
    assert fact.process(sent(["cut short"])) == (255, ["cut short"])


def test_a_log_line_that_is_not_utf8_comes_escaped_and_the_lines_after_it_still_come(tmp_path):
    """Issue 26: paramiko decodes each line strictly, and pyinfra's reader stopped at such a line."""
    env = fake_docker(tmp_path)
    (tmp_path / "bin" / "docker").write_text("#!/bin/sh\nif [ \"$2\" = config ]; then echo web; exit 0; fi\n"
                                             "printf 'before\\n\\377 bad\\nafter\\n'\n")
    output = subprocess.run(["/bin/sh", "-c", ServiceLogsFact().command(str(tmp_path), "web", "", "", False)],
                            env=env, capture_output=True, timeout=30).stdout
    assert all(line.isascii() for line in output.split(b"\n"))  # nothing for paramiko to stop at
    assert ServiceLogsFact().process(output.decode().splitlines()) == (0, ["before", "\\xff bad", "after"])


# -- the host program, run here ----------------------------------------------------------------------------------


MANIFEST = "0" * 64 + "  compose.yaml\n"
DIGEST = "# salt " + "5a17" * 8 + "\nCOMPOSE_FILE=abc\n"
CONTAINERS = ("shop|web|running|Up 3 minutes (healthy)|", "shop|web|exited|Exited (0) 2 minutes ago|True",
              "other|db|exited|Exited (1) 1 hour ago|", "other|api|running|Up 4 seconds (health: starting)|",
              "other|job|running|Up 1 hour (unhealthy)|")  # the second: a `docker compose run` of web


@pytest.fixture
def host_dirs(tmp_path, monkeypatch):
    """A host's lock directory, compose directory (one file pushed, its .env the current release's), releases
    and env directory, and a `docker` on PATH that lists CONTAINERS."""
    lock_dir, compose, releases, env_dir = (tmp_path / name for name in ("run", "compose", "releases", "env"))
    compose.mkdir()
    (compose / "compose.yaml").write_text("services: {}\n")
    (compose / ".env").write_text('COMPOSE_FILE="compose.yaml"\nCOMPOSE_PROJECT_NAME="shop"\n')
    subprocess.run(["sh", "-c", "sha256sum compose.yaml > .mlstack-files"], cwd=compose, check=True)
    (compose / ".env.digest").write_text(DIGEST)
    (releases / "rel-0123456789abcdef" / "project").mkdir(parents=True)
    (releases / "rel-0123456789abcdef" / "project" / ".env").write_text(
        'COMPOSE_FILE="compose.yaml"\nCOMPOSE_PROJECT_NAME="shop"\n')
    (releases / "current").symlink_to("rel-0123456789abcdef")
    for name in ("env-0123456789abcdef", "env-fedcba9876543210", "env-0123456789abcdef.tmp-x1"):
        (env_dir / "envs" / name).mkdir(parents=True)
    (env_dir / "active").symlink_to("envs/env-0123456789abcdef")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "docker").write_text("#!/bin/sh\n" + "".join(f"echo 'container {line}'\n"
                                                                      for line in CONTAINERS))
    (tmp_path / "bin" / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    return lock_dir, compose, releases, env_dir


def probe(*dirs: Path) -> HostState:
    output = subprocess.run(["/bin/sh", "-c", StatusFact().command(*map(str, dirs))], capture_output=True,
                            text=True, timeout=30)
    assert output.returncode == 0, output.stderr
    return StatusFact().process(output.stdout.splitlines())


def hold_lock(lock_dir: Path, who: str) -> subprocess.Popen:
    """The deploy's own lock program (tasks/host/lock.py), holding the lock until its stdin closes."""
    holder = subprocess.Popen(["/bin/sh", "-c", program("deploy_lock.sh", str(lock_dir), who)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_the_probe_reads_the_env_the_containers_and_the_files_as_a_release_names_them(host_dirs):
    compose = host_dirs[1]
    (compose / ".mlstack-files").write_text(MANIFEST)  # compose.yaml differs from this made-up hash
    recorded = release_of(HostConfig(stack="reranker"), SimpleNamespace(name="shop"),
                          Rendered("", "", DIGEST, {}, MANIFEST), NoEnv(None), [], {}, [])
    seen = probe(*host_dirs)
    assert seen.files == recorded.files  # as the deploy names a release's files (tasks/host/stack.py)
    assert seen.changed == ("compose.yaml",)
    assert seen.env == "env-0123456789abcdef" and seen.envs == ("env-0123456789abcdef", "env-fedcba9876543210")
    assert seen.project == "shop"
    assert seen.containers == {("shop", "web"): Container("running", "healthy"), ("other", "db"): Container("exited"),
                               ("other", "api"): Container("running", "starting"),
                               ("other", "job"): Container("running", "unhealthy")}
    assert seen.docker


def test_the_probe_tells_a_free_lock_from_a_held_one_and_who_holds_it(host_dirs):
    lock_dir = host_dirs[0]
    seen = probe(*host_dirs)
    assert (seen.lock, seen.holder, seen.changed, seen.dotenv) == ("free", "", (), "same")  # never taken
    holder = hold_lock(lock_dir, "ci@control pid 42 since 2026-12-07T05:00:00Z")
    try:
        assert probe(*host_dirs).lock == "held" and probe(*host_dirs).holder.startswith("ci@control pid 42")
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    assert probe(*host_dirs).lock == "free"  # the file stays, with the last holder's line in it


def test_reading_the_lock_never_takes_it(host_dirs):
    """While the probe reads a free lock over and over, the deploy's own lock program takes it every time."""
    lock_dir = host_dirs[0]
    hold_lock(lock_dir, "first").stdin.close()  # the lock file exists from now on
    command = StatusFact().command(*map(str, host_dirs))
    reader = subprocess.Popen(["/bin/sh", "-c", f"while :; do {command} >/dev/null; done"])
    try:
        take = program("deploy_lock.sh", str(lock_dir), "deploy") + " </dev/null"
        for _ in range(20):  # a count, not a time window: under load fewer takes fit in any window
            taker = subprocess.run(["/bin/sh", "-c", take], capture_output=True, text=True, timeout=30)
            assert taker.stdout.strip() == "locked", taker.stdout
    finally:
        reader.kill()
        reader.wait()


def test_the_probe_names_files_edited_or_removed_since_the_push_and_a_changed_env(host_dirs):
    compose, releases = host_dirs[1:3]
    (compose / "compose.yaml").write_text("services: {web: {image: other}}\n")
    assert probe(*host_dirs).changed == ("compose.yaml",)
    (compose / "compose.yaml").unlink()
    (compose / ".env").write_text('COMPOSE_FILE="compose.yaml"\nEXTRA=1\n')
    seen = probe(*host_dirs)
    assert (seen.changed, seen.dotenv) == (("compose.yaml (missing)",), "differs")
    (releases / "current").unlink()
    (compose / ".env.digest").unlink()
    seen = probe(*host_dirs)
    assert (seen.dotenv, seen.files) == ("no-release", None)


def test_a_release_the_reader_cannot_open_is_unknown_not_a_difference(host_dirs):
    if os.geteuid() == 0:
        pytest.skip("root reads every directory")
    releases = host_dirs[2]
    releases.chmod(0)
    try:
        assert probe(*host_dirs).dotenv == "unknown"
    finally:
        releases.chmod(stat.S_IRWXU)


def test_docker_that_cannot_list_the_containers_is_said(host_dirs, tmp_path):
    (tmp_path / "bin" / "docker").write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    seen = probe(*host_dirs)
    assert not seen.docker and seen.containers == {}


def test_the_probe_program_is_inlined_with_every_argument_quoted():
    command = StatusFact().command("/run/mlstack", "/srv/my compose", "/srv/mlstack/releases", "/srv/env")
    assert command == program("status_probe.sh", "/run/mlstack", "/srv/my compose", "/srv/mlstack/releases",
                              "/srv/env")
    assert "'/srv/my compose'" in command
