"""What the fleet test modules share: a plain compose project, a new env to install, a host's active env and
envs, the bytes sent to a host, the mlstack command, copies of the reranker project, a host's SSH sessions (to
kill a connection on the host's side), an argv watch, and waiting for a condition."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import yaml

from rehearsal import hub
from rehearsal.baseimage import IMAGE_NAME
from rehearsal.index import WHEELHOUSE

REPO = Path(__file__).parents[2]
RERANKER = REPO / "files/stacks/reranker"
ENV_DIR = "/srv/mlstack/ml-env"
CACHE = "/srv/mlstack/hf-cache"
REHEARSAL = (Path(__file__).parents[2] / "files" / "requirements.rehearsal.txt").read_text()
BALLAST = "mlstack-ballast"
BALLAST_DATA = random.Random(15).randbytes(6_000_000)
BALLAST_OBJECT = hashlib.sha256(BALLAST_DATA).hexdigest() + "-644"  # its name in an env store


def ballast_wheel(name: str = BALLAST, data: bytes = BALLAST_DATA) -> Path:
    """A real wheel NAME in the rehearsal index holding DATA (by default 6 MB) that no other env has: a new env
    with it is sent at least that much (only new files travel), so a transfer lasts long enough to be
    interrupted. Its content is fixed, and so is the id of every env built with it."""
    package = name.replace("-", "_")
    wheel = WHEELHOUSE / f"{package}-1.0-py3-none-any.whl"
    if not wheel.exists():
        files = {
            f"{package}/__init__.py": b"",
            f"{package}/ballast.bin": data,
            f"{package}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
            f"{package}-1.0.dist-info/WHEEL":
                b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
            f"{package}-1.0.dist-info/top_level.txt": f"{package}\n".encode(),
        }
        record = "".join(f"{path},,\n" for path in files) + f"{package}-1.0.dist-info/RECORD,,\n"
        partial = wheel.with_suffix(".partial")
        with zipfile.ZipFile(partial, "w") as archive:
            for path, content in {**files, f"{package}-1.0.dist-info/RECORD": record.encode()}.items():
                archive.writestr(zipfile.ZipInfo(path, (2020, 1, 1, 0, 0, 0)), content)
        partial.rename(wheel)
    return wheel


def new_requirements(tmp_path: Path, name: str = BALLAST, data: bytes = BALLAST_DATA) -> str:
    """Requirements that make a new env on the next deploy, with DATA (6 MB) of new files (`ballast_wheel`)."""
    ballast_wheel(name, data)
    path = tmp_path / f"next-{name}.txt"
    path.write_text(REHEARSAL + f"{name}==1.0\n")
    return f"ml_env_requirements={path}"


def requirements_file(tmp_path: Path, name: str, text: str) -> str:
    """`ml_env_requirements=` a file NAME holding TEXT."""
    path = tmp_path / name
    path.write_text(text)
    return f"ml_env_requirements={path}"


def active(fleet, record) -> str:
    return fleet.ssh(record, f"readlink {ENV_DIR}/active || true").strip().removeprefix("envs/")


def envs_on(fleet, record) -> list[str]:
    return fleet.ssh(record, f"ls {ENV_DIR}/envs 2>/dev/null || true").split()


def sent_to(fleet, record) -> int:
    """Bytes the control node has sent on RECORD's link (the host-side veth's peer), deploy traffic included."""
    device = fleet.fleet.veth(int(record.name.removeprefix("host")))
    return int(Path(f"/sys/class/net/{device}/statistics/tx_bytes").read_text())


def mlstack(fleet, *args: str) -> subprocess.CompletedProcess:
    """`mlstack ARGS` (as `python -m tasks.cli`) against the test fleet, from the checkout."""
    return subprocess.run([sys.executable, "-m", "tasks.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "MLSTACK_FLEET": fleet.fleet.name}, timeout=900)


def project_copy(tmp_path: Path, version: str) -> Path:
    """A copy of the reranker project whose app differs by VERSION (so its built image does too)."""
    project = tmp_path / f"reranker-{version}"
    shutil.copytree(RERANKER, project)
    (project / "app.py").write_text((RERANKER / "app.py").read_text() + f"# version {version}\n")
    return project


def reranker_edited(tmp_path: Path, name: str, edit: Callable[[dict], None]) -> Path:
    """A copy of the reranker project named NAME whose compose.yaml EDIT has changed (a project of the user's own)."""
    project = tmp_path / name
    shutil.copytree(RERANKER, project)
    compose = yaml.safe_load((project / "compose.yaml").read_text())
    edit(compose)
    (project / "compose.yaml").write_text(yaml.safe_dump(compose, sort_keys=False))
    return project


def snapshot_hashes(fleet, record, folder: str, commit: str, cache: str = CACHE) -> dict[str, str]:
    """sha256 of every file of the snapshot on the host, read through its symlinks."""
    output = fleet.ssh(record, f"cd {cache}/hub/{folder}/snapshots/{commit} && find . -type l -exec sha256sum {{}} +")
    return {path.removeprefix("./"): digest for digest, path in (line.split(None, 1) for line in output.splitlines())}


def hub_requests(fleet) -> list[hub.Request]:
    """What the fleet's HF mirror has been asked, in order."""
    return hub.access_log(fleet.fleet.dir)


def wait_until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def ssh_sessions(fleet, record) -> list[int]:
    """The host's sshd processes serving a connection (children of its listening sshd)."""
    sshd = {}
    for pid in fleet.fleet.host_pids(record):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            if Path(f"/proc/{pid}/comm").read_text().strip() == "sshd":
                sshd[pid] = int(fields[1])  # its parent
    return [pid for pid, parent in sshd.items() if parent in sshd]


class ArgvWatch(threading.Thread):
    """Samples every process's argv on this machine (the hosts share its pid namespace) until stopped."""

    def __init__(self, needles: list[str]):
        super().__init__(daemon=True)
        self.needles, self.seen, self.hits = [needle.encode() for needle in needles], set(), []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for entry in Path("/proc").iterdir():
                try:
                    argv = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
                except OSError:
                    continue
                self.seen.add(argv[:200])
                if any(needle in argv for needle in self.needles):
                    self.hits.append(argv.replace(b"\0", b" ")[:300])
            self.done.wait(0.01)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join()


def plain_project(tmp_path: Path) -> Path:
    """A compose project of one plain `image:` service, the image every rehearsal host holds: no build, no env
    (unless `ml_services` gives `web` one)."""
    project = tmp_path / "plain"
    project.mkdir(exist_ok=True)
    (project / "compose.yaml").write_text(yaml.safe_dump({"name": "mlstack-plain", "services": {"web": {
        "image": IMAGE_NAME, "command": ["python3", "-m", "http.server", "8090"],
        "healthcheck": {"test": ["CMD", "bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8090 && printf 'GET / HTTP/1.0"
                                 "\\r\\n\\r\\n' >&3 && read -r status <&3 && [[ $$status == *' 200 '* ]]"],
                        "interval": "2s", "timeout": "5s", "retries": 30}}}}, sort_keys=False))
    return project
