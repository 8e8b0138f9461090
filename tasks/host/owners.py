"""Who owns what lies below each directory the deploy works in.

The deploy works in each managed directory as one uid (`as_owner`: the directory's configured owner;
root in the compose project and the releases), and chowns only the directory itself. Below it, a path
another user owns (an owner changed from 1000 to 0, a model cache that was there before) or a directory
another user can write is a place where that user can swap a link in while the deploy works: root
would then chmod, write or rename through it. So before anything changes, a host where any managed
tree holds such an entry fails, with the entry, its owner and what to run; the deploy never works as
root through paths someone else owns. `files/host/owners_probe.sh` finds the first such entry of
each tree (one `find` a tree, links never followed).
"""

from __future__ import annotations

from dataclasses import dataclass

from pyinfra.api import FactBase

from ..config import HostConfig
from .failure import HostProblem, step
from .probe import ProbePart, probe_host
from .programs import program
from .releases import releases_dir


@dataclass(frozen=True)
class Tree:
    """A directory the deploy works in as uid:gid, named by the setting that places it."""

    setting: str
    path: str
    uid: int
    gid: int
    own_setting: bool  # whether {setting}_uid may name a non-root owner, who the deploy then works as


@dataclass(frozen=True)
class Entry:
    """The first entry of a tree that someone other than the tree's worker could swap (owners_probe.sh)."""

    uid: int
    gid: int
    mode: int
    kind: str  # find's %y: d, f, l, p, s, b, c
    path: str


def trees(config: HostConfig) -> tuple[Tree, ...]:
    """Every tree the deploy works in below a managed directory, and as whom."""
    by_setting = {spec.setting: spec for spec in config.directories()}
    return (
        *(Tree(spec.setting, spec.path, spec.uid, spec.gid, True)
          for spec in (by_setting["ml_env_dir"], by_setting["model_cache_dir"])),
        Tree("compose_project_dir", config.compose_project_dir, 0, 0, False),  # root's: settings refuse others
        Tree("stack_root", releases_dir(config), 0, 0, False),  # root's own 0700 releases (releases.sh)
    )


class OwnersFact(FactBase):
    """For each tree (by its place in TREES: path, worker uid, the group besides root's that may write its
    directories), the first entry that the tree's worker does not own alone."""

    def command(self, trees: tuple[tuple[str, int, int], ...]) -> str:
        return program("owners_probe.sh", *(value for tree in trees for value in tree))

    def process(self, output: list[str]) -> dict[int, Entry]:
        found = {}
        for record in "\n".join(output).split("\0")[:-1]:  # NUL-ended (a path may hold a newline), then a newline
            index, uid, gid, mode, kind, path = record.removeprefix("\n").split(" ", 5)
            found[int(index)] = Entry(int(uid), int(gid), int(mode, 8), kind, path)
        return found


def probe_part(config: HostConfig) -> ProbePart:
    # Root works only where root's group alone may write; another worker, also where its own group may.
    return ProbePart("owners", OwnersFact, {"trees": tuple((tree.path, tree.uid, tree.gid if tree.uid else 0)
                                                           for tree in trees(config))})


def worker(tree: Tree) -> str:
    return "root" if tree.uid == 0 else f"uid {tree.uid}"


def entry_problem(tree: Tree, entry: Entry) -> str:
    """What ENTRY, found in TREE, lets another user do, and what to run so that the deploy can work there."""
    where = f"{entry.path} (in {tree.setting} {tree.path})"
    if entry.uid != tree.uid and not (entry.uid == 0 and entry.path == tree.path):
        fix = f"on the host, run `chown -R {tree.uid}:{tree.gid} {tree.path}`"
        if tree.own_setting and entry.uid != 0:
            fix += (f", or set {tree.setting}_uid = {entry.uid} (and {tree.setting}_gid to its group) "
                    "so that the deploy works there as that user")
        risk = ("which cannot change it" if entry.uid == 0 else
                "and that user could swap a link in where the deploy works")
        return (f"{where} belongs to uid {entry.uid}, but the deploy works there as {worker(tree)}, {risk}; "
                f"{fix}; nothing on this host was changed")
    who = "every user" if entry.mode & 0o002 else f"group {entry.gid}"
    return (f"{where} is a directory {who} can write (mode {entry.mode:04o}), and the deploy works there as "
            f"{worker(tree)}: they could swap a link in where the deploy works; on the host, run "
            f"`chmod go-w {entry.path}` and check what else is in {tree.path}; nothing on this host was changed")


def owner_problems(trees: tuple[Tree, ...], found: dict[int, Entry]) -> list[str]:
    """One message for each tree where FOUND (the `OwnersFact`) names an entry: the host must not be worked on."""
    return [entry_problem(tree, found[index]) for index, tree in enumerate(trees) if index in found]


@step("Directory owners")
def check(config: HostConfig, found: dict[int, Entry]) -> bool:
    """True when the deploy may work in every tree; otherwise the host fails (HostProblem) before any change."""
    problems = owner_problems(trees(config), found)
    if problems:
        raise HostProblem("; ".join(problems))
    return True


def probe_checked(config: HostConfig, *parts: ProbePart) -> tuple | None:
    """`probe_host(*PARTS)` with the owners part read in the same round trip and checked: None when a part
    failed or the deploy must not work in a tree (the host failed, before any change)."""
    on_host = probe_host(*parts, probe_part(config))
    if on_host is None or not check(config, on_host[-1]):
        return None
    return on_host[:-1]
