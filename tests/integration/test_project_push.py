"""The compose project pushed to real hosts (issue 26 part 4): its files keep their source's modes (a 0600
compose file secret stays 0600, a mode-only change is pushed), a directory of the project becomes a file and a
file a directory, and an HTTP check the service answers with a redirect fails, naming where, never followed."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from fleet_helpers import reranker_edited

COMPOSE = "/srv/mlstack/compose"
PROJECT = "mlstack-reranker"


@pytest.fixture(scope="module", autouse=True)
def stack_down_after(fleet):
    yield
    fleet.wipe()


def kinds(fleet, record, *names: str) -> list[str]:
    """'MODE KIND NAME' of each of NAMES in the host's compose directory."""
    return fleet.ssh(record, f"cd {COMPOSE} && stat -c '%a %F %n' " + " ".join(names)).splitlines()


@pytest.mark.heavy
def test_project_files_keep_their_modes_and_change_kind_on_real_hosts_and_a_redirect_fails_its_check(
        fleet, tmp_path):
    def db_password_as_a_file(compose):
        compose["services"]["reranker"]["secrets"] = ["db_password"]
        compose["secrets"] = {"db_password": {"file": "./secrets/db_password"}}

    project = reranker_edited(tmp_path, "modes", db_password_as_a_file)
    (project / "secrets").mkdir()
    (project / "secrets/db_password").write_text("pw-1")
    (project / "secrets/db_password").chmod(0o600)
    (project / "config").mkdir()
    (project / "config/app.yml").write_text("a: 1\n")
    (project / "notes.txt").write_text("notes")
    (project / "notes.txt").chmod(0o664)
    stack = ("--data", f"stack={project}")
    first = fleet.deploy(*stack)
    assert first.returncode == 0, first.output[-3000:]
    for record in fleet.hosts:
        assert kinds(fleet, record, "secrets/db_password", "config/app.yml", "notes.txt", ".env") == [
            "600 regular file secrets/db_password", "644 regular file config/app.yml", "644 regular file notes.txt",
            "600 regular file .env"]
        assert fleet.ssh(record, f"docker exec {PROJECT}-reranker-1 cat /run/secrets/db_password") == "pw-1"

    (project / "notes.txt").chmod(0o640)  # a mode-only change
    shutil.rmtree(project / "config")
    (project / "config").write_text("now a file\n")
    second = fleet.deploy(*stack)
    assert second.returncode == 0, second.output[-3000:]
    for record in fleet.hosts:
        assert kinds(fleet, record, "notes.txt", "config") == ["640 regular file notes.txt",
                                                               "644 regular file config"]
        assert fleet.ssh(record, f"cat {COMPOSE}/config") == "now a file\n"

    (project / "config").unlink()
    (project / "config/sub").mkdir(parents=True)
    (project / "config/sub/app.yml").write_text("a: 2\n")
    # docs serves / : its /app (a directory) answers 301 to /app/, whose listing would answer 200
    compose = yaml.safe_load((project / "compose.yaml").read_text())
    compose["services"]["docs"]["command"] = ["python3", "-m", "http.server", "8081", "--directory", "/"]
    (project / "compose.yaml").write_text(yaml.safe_dump(compose, sort_keys=False))
    third = fleet.deploy(*stack, "--data", f"http_checks={json.dumps(['http://{host}:8081/app'])}",
                         "--data", "health_timeout=60")  # the gate's time under load; the check retries as long
    assert third.returncode != 0
    for record in fleet.hosts:
        assert kinds(fleet, record, "config/sub/app.yml") == ["644 regular file config/sub/app.yml"]
        assert third.report[record.name]["failure"]["message"] == (
            f"stack {PROJECT}: check http://{record.ip}:8081/app: HTTP 301: redirected to /app/ "
            "(not followed: a check passes on a 2xx answer only)")
