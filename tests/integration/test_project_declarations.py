"""What the user's compose project itself declares, checked on each host before anything on it changes, on a
real 2-host fleet: an external volume one host lacks, a service's own GPU reservation on CPU hosts (and, on
a GPU-shaped host, kept as written and not doubled), and `docker compose up` failing at once with compose's
own message. The projects are small ones of the user's own, run on the rehearsal base image (no build)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from conftest import REPO

from tasks.fleet.runner import run_deploy

COMPOSE = "/srv/mlstack/compose"
FIXTURES = Path(__file__).parents[1] / "unit/host/fixtures"
H100 = (FIXTURES / "nvidia-smi-h100.txt").read_text().splitlines()[0]
VOLUME = "mlstack-decl-data"
# No ML env, no models, no GPUs or checks of the rehearsal's own: only the project's declarations count.
SETTINGS = {"ml_services": {}, "service_gpus": {}, "models": [], "service_models": {}, "http_checks": []}

APP = """\
name: decl
services:
  app:
    image: ${MLSTACK_BASE_IMAGE}
    command: ["sleep", "infinity"]
    init: true
"""
WITH_VOLUME = APP + f"""\
    volumes: [data:/data]
volumes:
  data:
    external: true
    name: {VOLUME}
"""
WITH_GPUS = APP + """\
    deploy:
      resources:
        reservations:
          devices:
            - driver: nvidia
              count: all
              capabilities: [gpu]
"""
ABSENT_IMAGE = """\
name: decl
services:
  app:
    image: mlstack-decl-absent:1
    pull_policy: never
    command: ["sleep", "infinity"]
"""
NEVER_HEALTHY = APP + """\
    healthcheck: {test: ["CMD", "false"], interval: 1s, retries: 1}
"""
INVENTORY = '''"""The rehearsal inventory, each host with a compose project of its own (tests: declarations)."""
import json
import runpy

_hosts, _data = runpy.run_path({inventory!r})["rehearsal"]
_stacks = json.loads({stacks!r})
_settings = json.loads({settings!r})
rehearsal = ([(name, {{**data, "stack": _stacks[name]}}) for name, data in _hosts], {{**_data, **_settings}})
'''


@pytest.fixture(scope="module", autouse=True)
def clean(fleet):
    fleet.wipe()
    yield
    fleet.wipe()
    for record in fleet.hosts:
        fleet.ssh(record, f"docker volume rm -f {VOLUME} >/dev/null")


def project(tmp_path: Path, text: str) -> Path:
    directory = tmp_path / f"project-{abs(hash(text))}"
    directory.mkdir()
    (directory / "compose.yaml").write_text(text)
    return directory


def deploy(fleet, directory: Path, *args: str, **settings):
    data = {"stack": str(directory), **SETTINGS, **settings}
    return fleet.deploy(*args, *[arg for key, value in data.items() for arg in (
        "--data", f"{key}={value if isinstance(value, str) else json.dumps(value)}")])


def on_host(fleet, record) -> str:
    """Everything the deploy could change there: every path under /srv/mlstack with its mode, size and mtime,
    each file's sha256, and each container with its id and start time."""
    return fleet.ssh(record, "find /srv/mlstack -printf '%p %m %s %T@\\n' | sort; "
                             "find /srv/mlstack -type f -exec sha256sum {} + | sort; "
                             "docker ps -aq --no-trunc | sort "
                             "| xargs -r docker inspect -f '{{.Id}} {{.State.StartedAt}}'")


def message(run, record) -> str:
    return run.report[record.name]["failure"]["message"]


def test_a_host_lacking_an_external_volume_fails_at_plan_time_and_the_other_converges(fleet, tmp_path):
    lacking, having = fleet.hosts
    first = deploy(fleet, project(tmp_path, APP))
    assert first.returncode == 0, first.output[-3000:]
    fleet.ssh(having, f"docker volume create {VOLUME} >/dev/null")
    before = on_host(fleet, lacking)

    run = deploy(fleet, project(tmp_path, WITH_VOLUME))
    assert run.returncode != 0
    assert message(run, lacking) == (f"external volume '{VOLUME}' (used by app) is not on this host: create it with "
                                     f"`docker volume create {VOLUME}`")
    assert run.report[lacking.name]["failure"]["step"] == "Stack"
    assert on_host(fleet, lacking) == before  # its project files, the env, its container: all as they were
    assert run.report[having.name]["result"] == "ok", run.output[-3000:]
    mounts = fleet.ssh(having, "docker inspect -f '{{range .Mounts}}{{.Name}} {{.Destination}}{{end}}' decl-app-1")
    assert mounts.split() == [VOLUME, "/data"]


def test_a_service_reserving_gpus_itself_fails_cpu_hosts_at_plan_time_and_is_kept_as_written_on_a_gpu_host(
        fleet, tmp_path):
    directory = project(tmp_path, WITH_GPUS)
    before = {record.name: on_host(fleet, record) for record in fleet.hosts}
    run = deploy(fleet, directory)
    assert run.returncode != 0
    for record in fleet.hosts:
        assert message(run, record) == (
            "service app asks for GPUs (deploy.resources.reservations.devices: driver nvidia, count all, "
            "capabilities gpu), and this host has none (no nvidia-smi): deploy it to GPU hosts only, or give it a "
            "compose profile this host's stack_profiles leave out")
        assert on_host(fleet, record) == before[record.name]

    gpu_host, cpu_host = fleet.hosts
    with fleet.gpu_shaped(gpu_host, [H100]):  # an H100 and the toolkit's hook, as the probe sees them
        dry = deploy(fleet, directory, "--dry", "--diff")
    assert dry.report[gpu_host.name]["result"] == "ok", dry.output[-3000:]
    assert dry.report[cpu_host.name]["failure"]["message"].startswith("service app asks for GPUs")
    # The user's compose.yaml goes as written; the override adds no reservation of its own for the service.
    override = diff_of(dry.output, gpu_host.name, "compose.mlstack.yml")
    assert override and any("mlstack.config" in line for line in override)
    assert not any(re.search(r"deploy|devices|nvidia|GPU-", line) for line in override), override
    assert "+            - driver: nvidia" in diff_of(dry.output, gpu_host.name, "compose.yaml")
    assert on_host(fleet, gpu_host) == before[gpu_host.name]  # a dry run


def diff_of(output: str, host: str, name: str) -> list[str]:
    """The lines of the plan's diff of NAME on HOST (after its `+++ NAME (new)` header, up to the next file)."""
    lines, inside = [], False
    for line in output.splitlines():
        text = line.partition(f"[{host}]   ")[2] if f"[{host}]   " in line else None
        if text is not None and text.startswith(("--- ", "+++ ")):
            inside = text == f"+++ {name} (new)"
        elif inside and text is not None:
            lines.append(text)
        elif inside:
            break
    return lines


def test_when_compose_up_itself_fails_the_host_fails_at_once_with_composes_message(fleet, tmp_path):
    """One run: host1's project names an image compose cannot find, host2's starts but never gets healthy."""
    failing_up, unhealthy = fleet.hosts
    inventory = tmp_path / "per_host_stacks.py"
    inventory.write_text(INVENTORY.format(
        inventory=str(REPO / "inventory/rehearsal.py"),
        stacks=json.dumps({failing_up.name: str(project(tmp_path, ABSENT_IMAGE)),
                           unhealthy.name: str(project(tmp_path, NEVER_HEALTHY))}),
        settings=json.dumps(SETTINGS)))
    started = time.monotonic()
    run = run_deploy("-y", "--data", "health_timeout=600", inventory=str(inventory),
                     env={"MLSTACK_FLEET": fleet.fleet.name})
    assert run.returncode != 0
    assert time.monotonic() - started < 300  # not the health timeout: compose failed at once, and said why
    failure = message(run, failing_up)
    assert failure.startswith("stack decl: docker compose up failed: Error response from daemon: no such image: "
                              "mlstack-decl-absent:1"), failure
    assert run.report[failing_up.name]["stack"]["health"] == "unhealthy"
    # A service that starts and then is unhealthy is still the health gate's, with its name.
    assert message(run, unhealthy) == "stack decl: not healthy within 600s: app"
    assert run.report[unhealthy.name]["stack"]["unhealthy"] == ["app"]
    assert f"[{unhealthy.name}] last log lines of app:" in run.output
