"""The rehearsal's package index: a wheelhouse made by `pip download`, served by pypiserver.

The control node fetches wheels once (from whatever index this machine's pip uses); the
bootstrap builds then install only from this index, on the fleet's bridge address: hosts and
builds never need PyPI. pypiserver's fallback redirect to PyPI is disabled.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rehearsal.baseimage import CACHE_DIR
from rehearsal.listening import wait_until_listening

WHEELHOUSE = CACHE_DIR / "wheelhouse"
PORT = 3141
REPO = Path(__file__).resolve().parent.parent
REHEARSAL_REQUIREMENTS = REPO / "files/requirements.rehearsal.txt"


def add_to_wheelhouse(requirements: Path) -> None:
    """Download REQUIREMENTS and their dependencies as wheels (binary only: the build has no compiler)."""
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    print(f"index: wheels for {requirements.name} -> {WHEELHOUSE}", flush=True)
    subprocess.run(
        # This interpreter matches the base image here (CPython 3.11, x86_64, glibc 2.36).
        [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--only-binary=:all:",
         "-d", str(WHEELHOUSE), "-r", str(requirements)],
        check=True,
    )


def start(address: str, log: Path) -> subprocess.Popen:
    """Serve the wheelhouse on ADDRESS:PORT; return once it answers."""
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("pypi-server")), "run", "--interface", address, "--port", str(PORT),
         "--disable-fallback", "--authenticate", ".", "--passwords", ".", "--backend", "simple-dir", str(WHEELHOUSE)],
        stdin=subprocess.DEVNULL, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    wait_until_listening(process, address, PORT, 30, "pypiserver", log)
    return process


def index_url(address: str) -> str:
    return f"http://{address}:{PORT}/simple/"
