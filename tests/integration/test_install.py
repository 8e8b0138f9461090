"""Day one as a team meets it: the wheel installed into a fresh virtual environment outside the checkout, and
`mlstack plan` / `mlstack deploy` run from a directory holding only an inventory and a small compose project
with its own `.env`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from rehearsal.baseimage import IMAGE_NAME

REPO = Path(__file__).parents[2]
COMPOSE = "/srv/mlstack/compose"
PORT = 8090

PROJECT = f"""\
services:
  greeter:
    image: {IMAGE_NAME}
    pull_policy: never
    command: ["sh", "-c", "mkdir -p /srv/www && printf %s \\"$$GREETING\\" > /srv/www/greeting && \\
      cd /srv/www && exec python3 -m http.server {PORT}"]
    environment:
      GREETING: ${{GREETING}}
      LEVEL: ${{LEVEL:-info}}
    ports: ["{PORT}:{PORT}"]
    healthcheck:
      test: ["CMD", "python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:{PORT}/greeting')"]
      interval: 1s
      retries: 30
"""
DOTENV = "# the team's own values\nGREETING='hello from the project .env'\nLEVEL=debug\n"


def inventory(fleet) -> str:
    """A plain pyinfra inventory of the test fleet, as a team would write one for its own hosts."""
    hosts = [(record.name, {"ssh_hostname": record.ip}) for record in fleet.hosts]
    return textwrap.dedent(f"""\
        gpu_hosts = (
            {hosts!r},
            {{
                "ssh_user": "root",
                "ssh_key": {str(fleet.fleet.key)!r},
                "ssh_known_hosts_file": {str(fleet.fleet.known_hosts)!r},
                "ssh_strict_host_key_checking": "yes",
                "stack": "./greeter",  # from the directory mlstack runs in
                "http_checks": ["http://{{host}}:{PORT}/greeting"],
                "health_timeout": 60,
            }},
        )
        """)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`mlstack` from the wheel, in a virtual environment of its own: the checkout is not on its path. The venv
    gets no pip of its own (ensurepip took 8 s): this pip installs the wheel and its dependencies into it
    (`--python`), without compiling their bytecode up front (most of the install's CPU)."""
    where = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", where / "dist",
                    REPO], check=True, capture_output=True, timeout=300)
    (wheel,) = (where / "dist").glob("mlstack_deploy-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", where / "venv"], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "--python", where / "venv/bin/python", "install", "--quiet",
                    "--disable-pip-version-check", "--no-compile", wheel], check=True, capture_output=True, timeout=600)
    return where / "venv/bin"


def test_the_wheel_holds_one_package_with_its_files_and_no_generic_names(installed):
    found = subprocess.run([installed / "python", "-c", "import importlib.util, mlstack.paths as p; "
                            "print(p.FILES); print(importlib.util.find_spec('tasks'), importlib.util.find_spec("
                            "'rehearsal'))"], capture_output=True, text=True, check=True, cwd="/").stdout.split("\n")
    files = Path(found[0])
    assert files.is_relative_to(installed.parent) and files == Path(found[0]).parent.parent / "mlstack/files"
    assert (files / "host/stack_probe.sh").is_file() and (files / "requirements.ml.txt").is_file()
    assert found[1] == "None None"  # no top-level `tasks` or `rehearsal` in site-packages


def test_mlstack_plans_then_deploys_a_teams_project_from_its_own_directory(fleet, installed, tmp_path):
    fleet.wipe()
    team = tmp_path / "team-repo"
    (team / "greeter").mkdir(parents=True)
    (team / "greeter/compose.yaml").write_text(PROJECT)
    (team / "greeter/.env").write_text(DOTENV)
    (team / "inventory.py").write_text(inventory(fleet))
    env = {"PATH": f"{installed}:{os.environ['PATH']}", "HOME": str(tmp_path / "home")}

    def mlstack(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([installed / "mlstack", *args], cwd=team, env=env, capture_output=True, text=True,
                              timeout=600)

    plan = mlstack("plan", "inventory.py")
    assert plan.returncode == 0, plan.stdout + plan.stderr[-3000:]
    assert "greeter" in plan.stdout and "+ LEVEL=***" in plan.stderr  # the project's own keys, values masked
    assert "hello from the project" not in plan.stdout + plan.stderr
    for record in fleet.hosts:  # a plan changes nothing
        assert fleet.ssh(record, f"test -e {COMPOSE} && echo there || echo absent").strip() == "absent"

    deploy = mlstack("deploy", "inventory.py")
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr[-3000:]
    assert "ML env" not in deploy.stderr.split("--> Beginning operation run")[-1]  # no service uses the env
    for record in fleet.hosts:
        with urllib.request.urlopen(f"http://{record.ip}:{PORT}/greeting", timeout=10) as answer:
            assert answer.read() == b"hello from the project .env"
        lines = fleet.ssh(record, f"stat -c '%a %U' {COMPOSE}/.env && cat {COMPOSE}/.env").splitlines()
        assert lines[0] == "600 root"
        assert "GREETING='hello from the project .env'" in lines and "LEVEL=debug" in lines
        state = fleet.ssh(record, "docker inspect -f '{{.State.Health.Status}} {{index .Config.Env}}' "
                                  "$(docker ps -q --filter label=com.docker.compose.service=greeter)")
        assert state.startswith("healthy") and "LEVEL=debug" in state  # the .env's value over the default

    again = mlstack("deploy", "inventory.py")
    assert again.returncode == 0 and "no change" in again.stdout, again.stdout + again.stderr[-3000:]
    fleet.wipe()
