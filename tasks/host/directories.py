"""Host directories: the stack root, ML env, model cache and compose project, with numeric owners.

Missing parents that the deploy creates are root's (0:0 0755); parents that already exist are
never touched, but must be root's alone: a parent another user can write lets that user swap what
root then creates or chowns below it for a link.
"""

from __future__ import annotations

import shlex
import stat
from dataclasses import dataclass
from pathlib import PurePosixPath

from pyinfra import host
from pyinfra.api import FactBase, operation

from ..config import DirectorySpec, HostConfig
from ..report import report
from .failure import HostProblem, step
from .probe import ProbePart


@dataclass(frozen=True)
class PathState:
    uid: int
    gid: int
    mode: int  # permission bits, setuid/setgid/sticky included
    is_dir: bool


class DirectoriesFact(FactBase):
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


def probe_part(config: HostConfig) -> ProbePart:
    return ProbePart("directories", DirectoriesFact, {"paths": watched_paths(config.directories())})


def parents_to_create(specs: list[DirectorySpec]) -> dict[str, list[str]]:
    """For each configured directory, the ancestors it creates when missing (top-down).

    An ancestor that is itself configured is left to its own entry; any other ancestor belongs
    to the first configured directory below it, in path order, so no path is created twice.
    """
    configured = {spec.path for spec in specs}
    claimed: set[str] = set()
    parents: dict[str, list[str]] = {}
    for spec in sorted(specs, key=lambda spec: spec.path):
        ancestors = [str(p) for p in reversed(PurePosixPath(spec.path).parents) if str(p) != "/"]
        parents[spec.path] = [p for p in ancestors if p not in configured and p not in claimed]
        claimed.update(parents[spec.path])
    return parents


def watched_paths(specs: list[DirectorySpec]) -> tuple[str, ...]:
    """Every configured directory and ancestor: what the `DirectoriesFact` is asked about."""
    paths = {spec.path for spec in specs}
    for spec in specs:
        paths.update(str(p) for p in PurePosixPath(spec.path).parents if str(p) != "/")
    return tuple(sorted(paths))


def writable_by_others(state: PathState) -> str | None:
    """Who other than root can write a directory in STATE (and so plant links in it), or None."""
    if state.uid != 0:
        return f"owned by uid {state.uid}"
    if state.mode & 0o002:
        return "writable by every user"
    if state.mode & 0o020 and state.gid != 0:
        return f"writable by group {state.gid}"
    return None


def unsafe_ancestor(spec: DirectorySpec, states: dict[str, PathState]) -> str | None:
    """Why an existing ancestor of SPEC is not root's alone, or None."""
    for parent in PurePosixPath(spec.path).parents:
        state = states.get(str(parent))
        who = state and writable_by_others(state)
        if who:
            return (f"{parent}, which holds {spec.setting} {spec.path}, is {who}: root would follow the links "
                    f"they can plant there; make it root's alone (chown 0:0, chmod go-w) or choose another path")
    return None


def directory_commands(spec: DirectorySpec, parents: list[str], states: dict) -> list[str]:
    """The commands that bring SPEC (and its missing PARENTS) to the wanted state: none if it is there."""
    owner, mode = f"{spec.uid}:{spec.gid}", f"{spec.mode:04o}"
    problem = unsafe_ancestor(spec, states)
    if problem:
        raise HostProblem(problem)
    commands = []
    for path in [*parents, spec.path]:
        state, quoted = states.get(path), shlex.quote(path)
        if state is None and path != spec.path:
            commands.append(f"mkdir -m 0755 {quoted}")
        elif state is None:
            # chmod after chown: chown may clear setgid bits.
            commands.append(f"mkdir -m {mode} {quoted} && chown {owner} {quoted} && chmod {mode} {quoted}")
        elif not state.is_dir:
            raise HostProblem(f"{path} ({spec.setting}) exists and is not a directory")
        elif path == spec.path:
            if (state.uid, state.gid) != (spec.uid, spec.gid):
                commands.append(f"chown {owner} {quoted}")
            if state.mode != spec.mode:
                commands.append(f"chmod {mode} {quoted}")
    return commands


@operation()
def owned_directory(commands: list[str]):
    """Ensure a directory exists with a numeric owner, group and mode (and its missing parents)."""
    yield from commands


@step("Host directories")
def converge(config: HostConfig, states: dict[str, PathState]):
    """STATES: every path of `watched_paths`, as the `DirectoriesFact` read them."""
    specs = sorted(config.directories(), key=lambda spec: spec.path)
    parents = parents_to_create(specs)
    planned = {spec.path: directory_commands(spec, parents[spec.path], states) for spec in specs}  # all checked first
    if not any(planned.values()):  # no operation: on a no-op, pyinfra's per-operation work was most of this step's
        host.log(f"Host directories: {len(specs)} as configured (no change)")
        return
    report[host.name].changed("directories")
    for spec in specs:
        if planned[spec.path]:
            owned_directory(name=f"Directory {spec.setting} {spec.path} ({spec.uid}:{spec.gid} {spec.mode:04o})",
                            commands=planned[spec.path])
