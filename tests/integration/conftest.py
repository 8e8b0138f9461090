"""A real rehearsal fleet for the whole test session, torn down at the end even on failure."""

from __future__ import annotations

import contextlib
import os
import shlex
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


LAST = "test_fanout"  # grows the session's fleet to 4 hosts: run last, no other module waits for it to shrink back


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.module.__name__ == LAST)  # stable: every other module keeps its place
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="fleet tests need root (namespaces, dockerd); run `make test` as root")
        for item in items:
            item.add_marker(skip)


class TestFleet:
    def __init__(self, fleet: Fleet, records: list[HostRecord]):
        self.fleet = fleet
        self.hosts = records

    def ssh(self, record: HostRecord, command: str, user: str = "root", check: bool = True, timeout: int = 60) -> str:
        result = subprocess.run(
            [*self.fleet.ssh_argv(record, user), command],
            capture_output=True, text=True, timeout=timeout,
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

    @contextlib.contextmanager
    def gpu_shaped(self, record: HostRecord, gpu_lines: list[str], hook: bool = True):
        """RECORD made GPU-shaped by fixtures, not by a GPU: an `nvidia-smi` that answers any query with
        GPU_LINES (lines of real captures, tests/unit/host/fixtures/) and, with HOOK, the
        `nvidia-container-runtime-hook` the NVIDIA Container Toolkit installs, which here refuses to run
        (there is no GPU behind it). Both are bind-mounted over /usr/local/sbin in the host's own mount
        namespace; the host's docker, sshd and everything else are the host's own."""
        smi = "#!/bin/sh\ncat <<'EOF'\n" + "\n".join(gpu_lines) + "\nEOF\n"
        refuse = ("#!/bin/sh\necho 'nvidia-container-runtime-hook (fixture): no GPU on this rehearsal host' >&2\n"
                  "exit 1\n")
        programs = {"nvidia-smi": smi, **({"nvidia-container-runtime-hook": refuse} if hook else {})}
        self.ssh(record, "mkdir -p /srv/fixture-gpu && " + " && ".join(
            f"printf %s {shlex.quote(text)} > /srv/fixture-gpu/{name} && chmod 0755 /srv/fixture-gpu/{name}"
            for name, text in programs.items()) + " && mount --bind /srv/fixture-gpu /usr/local/sbin")
        try:
            yield
        finally:
            self.ssh(record, "umount /usr/local/sbin && rm -r /srv/fixture-gpu")

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
def env_cache(tmp_path_factory) -> Path:
    """One ML env cache (`ml_env_cache_dir`) for the modules that only need an env built once, not a fresh or
    private one: it is content-addressed, so an env built by one module is the same for the next."""
    return tmp_path_factory.mktemp("env-cache")


@pytest.fixture(scope="session")
def fleet():
    fleet = Fleet(TEST_FLEET)
    try:
        yield TestFleet(fleet, fleet.up(2))
    finally:
        leftovers = fleet.down()
        assert leftovers == [], f"fleet down left {leftovers}"
