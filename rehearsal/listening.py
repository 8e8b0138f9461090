"""Wait for a service the rehearsal started to answer on its port; stop it (by pid) if it never does."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path


def wait_until_listening(process: subprocess.Popen, address: str, port: int, seconds: float, name: str,
                         log: Path) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((address, port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                if process.poll() is None:  # ours, by pid: nothing is left running unrecorded
                    process.kill()
                    process.wait()
                raise RuntimeError(f"{name} did not start on {address}:{port}; see {log}") from None
            time.sleep(0.1)
