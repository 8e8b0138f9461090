"""Facts: small reads of remote state, one command each, decisions are made from them."""

from __future__ import annotations

import re
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


ENV_NAME = re.compile(r"^(envs/(env-[0-9a-f]{16})(\.tmp)?|incoming/(env-[0-9a-f]{16})\.tar\.gz)$")


@dataclass(frozen=True)
class MlEnvHostState:
    active: str | None  # the env id `active` points at
    envs: dict[str, int]  # complete envs: id -> mtime (activation time)
    leftovers: tuple[str, ...]  # unfinished unpacks and uploads, relative to the env dir
    free_bytes: int  # on the file system that holds (or will hold) the env dir
    arch: str  # `uname -m`
    image_id: str | None  # the runtime base image's id on this host


class MlEnvState(FactBase):
    """What the ML env dir holds, the room left for it, and the host's copy of the runtime base image.

    Only names this deploy writes are reported (`envs/env-<16 hex>[.tmp]`, `incoming/<id>.tar.gz`);
    anything else in the directory is not ours to judge or remove.
    """

    def command(self, env_dir: str, image: str) -> str:
        return "\n".join([
            f"d={shlex.quote(env_dir)}",
            'p="$d"; while [ ! -e "$p" ]; do p=$(dirname "$p"); done',
            'echo "free $(df -Pk "$p" | awk \'NR==2 {print $4}\')"',
            'echo "arch $(uname -m)"',
            f"echo \"image $(docker image inspect -f '{{{{.Id}}}}' {shlex.quote(image)} 2>/dev/null)\"",
            'if cd "$d" 2>/dev/null; then',
            '  echo "active $(readlink active)"',
            '  for e in envs/* incoming/*; do [ -e "$e" ] && echo "entry $(stat -c %Y "$e") $e"; done',
            "fi",
            "true",
        ])

    def process(self, output: list[str]) -> MlEnvHostState:
        fields: dict[str, str] = {}
        envs: dict[str, int] = {}
        leftovers = []
        for line in output:
            key, _, value = line.partition(" ")
            if key != "entry":
                fields[key] = value.strip()
                continue
            mtime, _, name = value.partition(" ")
            match = ENV_NAME.match(name)
            if match and match.group(2) and not match.group(3):
                envs[match.group(2)] = int(mtime)
            elif match:
                leftovers.append(name)
        active = ENV_NAME.match(fields.get("active", ""))
        return MlEnvHostState(
            active=active.group(2) if active and not active.group(3) else None,
            envs=envs,
            leftovers=tuple(sorted(leftovers)),
            free_bytes=int(fields.get("free") or 0) * 1024,
            arch=fields.get("arch", ""),
            image_id=fields.get("image") or None,
        )
