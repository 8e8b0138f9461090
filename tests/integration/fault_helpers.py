"""What the fault and race tests share: a new env to install, a host's active env, a host's SSH
sessions (to kill a connection on the host's side), and waiting for a condition."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

ENV_DIR = "/srv/mlstack/ml-env"
REHEARSAL = (Path(__file__).parents[2] / "files" / "requirements.rehearsal.txt").read_text()


def new_requirements(tmp_path: Path) -> str:
    """Requirements that make a new env (and so an upload) on the next deploy: `packaging` comes in already
    as a dependency, and named in the requirements its dist-info gains REQUESTED, so the env's content and
    with it its id change (what pip installed, tasks/control/env_artifact.py `content_id`)."""
    path = tmp_path / "next.txt"
    path.write_text(REHEARSAL + "packaging\n")
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
