"""A real rehearsal fleet for the whole test session, torn down at the end even on failure."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rehearsal.fleet import Fleet, HostRecord
from tasks.fleet.runner import DeployRun, run_deploy

# Its own bridge and subnet: a developer's `make rehearse` fleet is left alone. MLSTACK_TEST_FLEET
# gives a second session on the same machine a fleet of its own.
REPO = Path(__file__).parents[2]
TEST_FLEET = os.environ.get("MLSTACK_TEST_FLEET", "itest")


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="fleet tests need root (namespaces, dockerd); run `make test` as root")
        for item in items:
            item.add_marker(skip)


class TestFleet:
    def __init__(self, fleet: Fleet, records: list[HostRecord]):
        self.fleet = fleet
        self.hosts = records

    def ssh(self, record: HostRecord, command: str, user: str = "root", check: bool = True) -> str:
        result = subprocess.run(
            [*self.fleet.ssh_argv(record, user), command],
            capture_output=True, text=True, timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{record.name}: {command!r} failed ({result.returncode}): {result.stderr}")
        return result.stdout

    @contextlib.contextmanager
    def throttled(self, record: HostRecord, rate: str = "12mbit"):
        """Traffic to RECORD slowed down, so that a transfer lasts long enough to be interrupted."""
        device = self.fleet.veth(int(record.name.removeprefix("host")))
        subprocess.run(["tc", "qdisc", "add", "dev", device, "root", "tbf", "rate", rate, "burst", "64kb",
                        "latency", "500ms"], check=True)
        try:
            yield
        finally:
            subprocess.run(["tc", "qdisc", "del", "dev", device, "root"], check=True)

    def wipe(self, *extra_paths: str) -> None:
        """Every host as before any deploy: the stack's containers removed, /srv/mlstack (and EXTRA_PATHS) gone."""
        paths = " ".join(("/srv/mlstack", *extra_paths))
        for record in self.hosts:
            self.ssh(record, "docker ps -aq --filter label=com.docker.compose.project"
                             " | xargs -r docker rm -f >/dev/null; "
                             f"rm -rf {paths}")

    def tool(self, module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        """`python -m MODULE inventory/rehearsal.py ARGS` (tasks.fleet.rollout, tasks.fleet.verify) against
        this fleet."""
        return subprocess.run([sys.executable, "-m", module, "inventory/rehearsal.py", *args], cwd=REPO,
                              env={**os.environ, "MLSTACK_FLEET": self.fleet.name, **(env or {})},
                              capture_output=True, text=True, timeout=600)

    def deploy(self, *args: str, env: dict | None = None) -> DeployRun:
        # -y skips pyinfra's change detection, which a dry run's plan is made of.
        confirm = () if "--dry" in args else ("-y",)
        return run_deploy(*confirm, *args, env={"MLSTACK_FLEET": self.fleet.name, **(env or {})})


@pytest.fixture(scope="session")
def fleet():
    fleet = Fleet(TEST_FLEET)
    try:
        yield TestFleet(fleet, fleet.up(2))
    finally:
        leftovers = fleet.down()
        assert leftovers == [], f"fleet down left {leftovers}"
