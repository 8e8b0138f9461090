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


BLOB_NAME = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")  # git sha1 (regular files) or sha256 (LFS files)


@dataclass(frozen=True)
class RepoCacheState:
    blobs: dict[str, int]  # complete blobs: name -> size
    snapshots: frozenset[str]  # complete snapshot dirs (commit shas)
    refs: dict[str, str]  # revision name -> commit sha
    trees: frozenset[str]  # commit shas with a cached tree listing
    hashes: dict[str, str]  # blob name -> its content hash as computed on the host (when asked)
    leftovers: tuple[str, ...]  # unfinished transfers, relative to the repo folder


@dataclass(frozen=True)
class ModelCacheHostState:
    repos: dict[str, RepoCacheState]  # repo folder (models--org--name) -> state; absent folders left out
    free_bytes: int


class ModelCacheState(FactBase):
    """The HF cache's repo folders this deploy manages (`<cache>/hub/<folder>`), and the room left.

    With `hashes`, every blob is hashed on the host the way its name says: sha256 (LFS files,
    64 hex) or git's blob sha1 (other files, 40 hex).
    """

    def command(self, cache_dir: str, folders: tuple[str, ...], hashes: bool = False) -> str:
        hash_blobs = (
            '  for b in "$f"/blobs/*; do n=${b##*/}; case ${#n} in'
            ' 64) echo "hash $n $(sha256sum < "$b" | cut -c1-64)";;'
            " 40) echo \"hash $n $( { printf 'blob %s\\000' $(stat -c %s \"$b\"); cat \"$b\"; } | sha1sum | cut -c1-40)\";;"
            " esac; done"
        )
        return "\n".join([
            f"d={shlex.quote(cache_dir)}",
            'p="$d"; while [ ! -e "$p" ]; do p=$(dirname "$p"); done',
            'echo "free $(df -Pk "$p" | awk \'NR==2 {print $4}\')"',
            'cd "$d/hub" 2>/dev/null || exit 0',
            f"for f in {' '.join(shlex.quote(folder) for folder in folders)}; do",
            '  [ -d "$f" ] || continue',
            '  echo "repo $f"',
            "  find \"$f/blobs\" -mindepth 1 -maxdepth 1 -printf 'blob %s %f\\n' 2>/dev/null",
            "  find \"$f/snapshots\" -mindepth 1 -maxdepth 1 -printf 'snapshot %f\\n' 2>/dev/null",
            "  find \"$f/trees\" -mindepth 1 -maxdepth 1 -printf 'tree %f\\n' 2>/dev/null",
            "  find \"$f/refs\" -type f -printf 'ref %P ' -exec head -c 64 {} \\; -printf '\\n' 2>/dev/null",
            hash_blobs if hashes else "  :",
            "done",
            "true",
        ])

    def process(self, output: list[str]) -> ModelCacheHostState:
        free, repos, current = 0, {}, None
        for line in output:
            kind, _, rest = line.partition(" ")
            if kind == "free":
                free = int(rest or 0) * 1024
            elif kind == "repo":
                current = repos[rest] = {"blobs": {}, "snapshots": set(), "refs": {}, "trees": set(), "hashes": {}, "leftovers": []}
            elif current is None:
                continue
            elif kind == "blob":
                size, _, name = rest.partition(" ")
                if BLOB_NAME.match(name):
                    current["blobs"][name] = int(size)
                else:
                    current["leftovers"].append(f"blobs/{name}")
            elif kind == "snapshot":
                if re.fullmatch(r"[0-9a-f]{40}", rest):
                    current["snapshots"].add(rest)
                else:
                    current["leftovers"].append(f"snapshots/{rest}")
            elif kind == "tree" and re.fullmatch(r"[0-9a-f]{40}\.json", rest):
                current["trees"].add(rest.removesuffix(".json"))
            elif kind == "ref":
                name, _, sha = rest.partition(" ")
                current["refs"][name] = sha.strip()
            elif kind == "hash":
                name, _, computed = rest.partition(" ")
                current["hashes"][name] = computed
        return ModelCacheHostState(
            repos={
                folder: RepoCacheState(state["blobs"], frozenset(state["snapshots"]), state["refs"],
                                       frozenset(state["trees"]), state["hashes"], tuple(sorted(state["leftovers"])))
                for folder, state in repos.items()
            },
            free_bytes=free,
        )


@dataclass(frozen=True)
class ContainerState:
    state: str  # running, exited, created, ...
    health: str  # "", "healthy", "unhealthy", "starting"
    labels: dict[str, str]


@dataclass(frozen=True)
class StackHostState:
    images: dict[str, str]  # "repository:tag" -> id, for the stack's image repository on the host
    containers: dict[str, ContainerState]  # compose service -> its container
    compose: str | None  # the docker-compose.yml in place
    digest: str | None  # .env.digest in place (key=hash lines: no secret)


CONTAINER_LABELS = ("mlstack.config", "mlstack.env-id", "mlstack.models", "mlstack.image")


class StackState(FactBase):
    """The compose project on the host: its files, its containers' state and mlstack labels, the stack's images."""

    def command(self, compose_dir: str, project: str, repository: str) -> str:
        labels = "|".join(f'{{{{.Label "{label}"}}}}' for label in CONTAINER_LABELS)
        quoted = shlex.quote(compose_dir)
        return "\n".join([
            f"docker images --no-trunc --format 'image {{{{.Repository}}}}:{{{{.Tag}}}} {{{{.ID}}}}' {shlex.quote(repository)}",
            f"docker ps -a --filter label=com.docker.compose.project={shlex.quote(project)} "
            f"--format 'container {{{{.Label \"com.docker.compose.service\"}}}}|{{{{.State}}}}|{{{{.Status}}}}|{labels}'",
            f"if [ -f {quoted}/docker-compose.yml ]; then echo compose-begin; sed 's/^/| /' {quoted}/docker-compose.yml; fi",
            f"if [ -f {quoted}/.env.digest ]; then echo digest-begin; sed 's/^/| /' {quoted}/.env.digest; fi",
            "true",
        ])

    def process(self, output: list[str]) -> StackHostState:
        images, containers, texts, current = {}, {}, {}, None
        for line in output:
            if line.startswith("image "):
                tag, _, image_id = line[6:].partition(" ")
                images[tag] = image_id.strip()
            elif line.startswith("container "):
                service, state, status, *values = line[10:].split("|")
                health = next((word for word in ("unhealthy", "healthy", "starting") if word in status), "")
                containers[service] = ContainerState(state, health, dict(zip(CONTAINER_LABELS, values)))
            elif line in ("compose-begin", "digest-begin"):
                current = line.removesuffix("-begin")
                texts[current] = []
            elif current and line.startswith("|"):
                texts[current].append(line[2:])
        return StackHostState(
            images=images,
            containers=containers,
            compose="".join(line + "\n" for line in texts["compose"]) if "compose" in texts else None,
            digest="".join(line + "\n" for line in texts["digest"]) if "digest" in texts else None,
        )


PART = "@@mlstack-fact "  # frames each part's output; no fact above prints a line starting so


class HostProbe(FactBase):
    """Several facts in one round trip: each part's command runs in its own subshell, and the lines
    it prints go to that fact's own process() (the facts above make sense of no lines at all).

    PARTS: (name, fact class, keyword arguments) triples; the result maps name -> that fact's value.
    """

    def command(self, parts: tuple[tuple[str, type[FactBase], dict], ...]) -> str:
        self.facts = {name: fact() for name, fact, _ in parts}
        return "\n".join(f"echo '{PART}{name}'\n( {self.facts[name].command(**kwargs)}\n)"
                         for name, _, kwargs in parts)

    def process(self, output: list[str]) -> dict:
        lines: dict[str, list[str]] = {}
        current = None
        for line in output:
            if line.startswith(PART):
                current = lines.setdefault(line[len(PART):], [])
            elif current is not None:
                current.append(line)
        return {name: fact.process(lines.get(name, [])) for name, fact in self.facts.items()}
