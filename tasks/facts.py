"""Facts: small reads of remote state, one command each, decisions are made from them."""

from __future__ import annotations

import shlex
import stat
from dataclasses import dataclass

from pyinfra.api import FactBase


@dataclass(frozen=True)
class PathState:
    uid: int
    gid: int
    mode: int  # permission bits, setuid/setgid/sticky included
    is_dir: bool


class PathStates(FactBase):
    """Numeric owner, mode and kind of each path, symlinks followed; absent paths are left out.

    Numeric on purpose: pyinfra's File fact reports owners by name, so a uid without a passwd
    entry (a container's uid 1000) never compares equal and `files.directory` re-chowns forever.
    """

    def command(self, paths: tuple[str, ...]) -> str:
        quoted = " ".join(shlex.quote(path) for path in paths)
        return f"stat -L -c '%u %g %f %n' -- {quoted} 2>/dev/null || true"

    def process(self, output: list[str]) -> dict[str, PathState]:
        states = {}
        for line in output:
            uid, gid, raw_mode, path = line.split(" ", 3)
            mode = int(raw_mode, 16)
            states[path] = PathState(int(uid), int(gid), stat.S_IMODE(mode), stat.S_ISDIR(mode))
        return states
