"""What the fault and race tests share: a new env to install, a host's active env, a host's SSH
sessions (to kill a connection on the host's side), and waiting for a condition."""

from __future__ import annotations

import contextlib
import hashlib
import random
import time
import zipfile
from pathlib import Path

from rehearsal.index import WHEELHOUSE

ENV_DIR = "/srv/mlstack/ml-env"
REHEARSAL = (Path(__file__).parents[2] / "files" / "requirements.rehearsal.txt").read_text()
BALLAST = "mlstack-ballast"
BALLAST_DATA = random.Random(15).randbytes(6_000_000)
BALLAST_OBJECT = hashlib.sha256(BALLAST_DATA).hexdigest() + "-644"  # its name in an env store


def ballast_wheel() -> Path:
    """A real wheel in the rehearsal index holding 6 MB that no other env has: a new env with it is sent at
    least that much (only new files travel), so a transfer lasts long enough to be interrupted. Its
    content is fixed, and so is the id of every env built with it."""
    wheel = WHEELHOUSE / "mlstack_ballast-1.0-py3-none-any.whl"
    if not wheel.exists():
        files = {
            "mlstack_ballast/__init__.py": b"",
            "mlstack_ballast/ballast.bin": BALLAST_DATA,
            "mlstack_ballast-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: mlstack-ballast\nVersion: 1.0\n",
            "mlstack_ballast-1.0.dist-info/WHEEL":
                b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
            "mlstack_ballast-1.0.dist-info/top_level.txt": b"mlstack_ballast\n",
        }
        record = "".join(f"{name},,\n" for name in files) + "mlstack_ballast-1.0.dist-info/RECORD,,\n"
        partial = wheel.with_suffix(".partial")
        with zipfile.ZipFile(partial, "w") as archive:
            for name, data in {**files, "mlstack_ballast-1.0.dist-info/RECORD": record.encode()}.items():
                archive.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), data)
        partial.rename(wheel)
    return wheel


def new_requirements(tmp_path: Path) -> str:
    """Requirements that make a new env on the next deploy, with 6 MB of new files (`ballast_wheel`)."""
    ballast_wheel()
    path = tmp_path / "next.txt"
    path.write_text(REHEARSAL + f"{BALLAST}==1.0\n")
    return f"ml_env_requirements={path}"


def active(fleet, record) -> str:
    return fleet.ssh(record, f"readlink {ENV_DIR}/active || true").strip().removeprefix("envs/")


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
