"""Install what the rehearsal fleet needs on the control node (Debian bookworm, as root).

Standard library only: this runs before the project's virtualenv exists.
Idempotent: a machine that already has everything is left alone and no registry is asked.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# git: the rehearsal hub builds its seed repos with it, and olah reads them through GitPython.
# shellcheck: `make lint` checks the programs that run on hosts (files/host/*.sh).
APT_PACKAGES = ("docker.io", "openssh-server", "debootstrap", "iproute2", "sudo", "util-linux", "git", "nftables",
                "shellcheck")
COMPOSE_PLUGIN = Path("/usr/libexec/docker/cli-plugins/docker-compose")
# The fleet's image registry (Debian's docker-registry, distribution 2.8): the binary alone.
REGISTRY = Path("/usr/local/lib/mlstack-rehearsal/docker-registry")
# Compose v2 is not packaged for bookworm; trixie's plugin binary runs here (needs libc6 >= 2.34).
COMPOSE_SUITE = "trixie"
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")


def missing_packages() -> list[str]:
    missing = []
    for package in APT_PACKAGES:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
        )
        if "install ok installed" not in result.stdout:
            missing.append(package)
    return missing


def debian_mirror(sources_text: str) -> str:
    """The URI of the machine's own Debian archive (deb822 or one-line format)."""
    for line in sources_text.splitlines():
        match = re.match(r"\s*URIs:\s*(\S+)", line) or re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)", line)
        if match and "security" not in match.group(1):
            return match.group(1).rstrip("/")
    raise SystemExit(f"no Debian archive found in {DEBIAN_SOURCES}: cannot fetch the compose plugin")


def machine_mirror() -> str:
    for path in (DEBIAN_SOURCES, Path("/etc/apt/sources.list")):
        if path.exists():
            try:
                return debian_mirror(path.read_text())
            except SystemExit:
                continue
    raise SystemExit("no Debian archive configured for apt: cannot fetch the compose plugin")


def install_registry() -> None:
    """Take the registry binary out of bookworm's docker-registry .deb: installing the package would start
    a registry on every address as a system service; the fleet starts its own, on its bridge address."""
    with tempfile.TemporaryDirectory(prefix="mlstack-registry-") as tmp:
        work = Path(tmp)
        subprocess.run(["apt-get", "-qq", "update"], check=True)
        subprocess.run(["apt-get", "-qq", "-oAPT::Sandbox::User=root", "download", "docker-registry"], check=True,
                       cwd=work)
        (deb,) = work.glob("docker-registry_*.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True)
        REGISTRY.parent.mkdir(parents=True, exist_ok=True)
        staged = REGISTRY.with_name(".docker-registry.new")
        shutil.copy2(work / "root/usr/bin/docker-registry", staged)
        staged.rename(REGISTRY)


def install_compose_plugin() -> None:
    """Fetch trixie's docker-compose .deb with a private apt state and take only the plugin binary."""
    mirror = machine_mirror()
    with tempfile.TemporaryDirectory(prefix="mlstack-compose-") as tmp:
        work = Path(tmp)
        (work / "lists/partial").mkdir(parents=True)
        (work / "cache/archives/partial").mkdir(parents=True)
        (work / "sources.list").write_text(f"deb {mirror} {COMPOSE_SUITE} main\n")
        apt_options = [
            f"-oDir::Etc::SourceList={work / 'sources.list'}",
            "-oDir::Etc::SourceParts=/dev/null",
            f"-oDir::State::Lists={work / 'lists'}",
            f"-oDir::Cache={work / 'cache'}",
            "-oAPT::Sandbox::User=root",
        ]
        subprocess.run(["apt-get", *apt_options, "-qq", "update"], check=True)
        subprocess.run(["apt-get", *apt_options, "-qq", "download", "docker-compose"], check=True, cwd=work)
        (deb,) = work.glob("docker-compose_*.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True)
        COMPOSE_PLUGIN.parent.mkdir(parents=True, exist_ok=True)
        staged = COMPOSE_PLUGIN.with_name(".docker-compose.new")
        shutil.copy2(work / "root" / COMPOSE_PLUGIN.relative_to("/"), staged)
        staged.rename(COMPOSE_PLUGIN)


def main() -> int:
    missing = missing_packages()
    if missing:
        print(f"prereqs: installing {' '.join(missing)}", flush=True)
        subprocess.run(["apt-get", "-qq", "update"], check=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            check=True,
            env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
    if not COMPOSE_PLUGIN.exists():
        print(f"prereqs: installing the compose v2 plugin from Debian {COMPOSE_SUITE}", flush=True)
        install_compose_plugin()
    if not REGISTRY.exists():
        print(f"prereqs: taking the image registry binary from Debian's docker-registry to {REGISTRY}", flush=True)
        install_registry()
    return 0


if __name__ == "__main__":
    sys.exit(main())
